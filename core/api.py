"""Python API for notebooks and tests.

from sft import api
config = api.load_config("config.toml")
train, evaluation = api.prepare_datasets(config)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sft.config.schema import Config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a TOML/YAML config (raises `sft.errors.ConfigError` with every problem).

    The config carries the process's plugins (`sft.manager.get_plugins()`); the functions below
    use them.
    """
    from sft.config import load_config as _load
    from sft.manager import get_plugins

    return _load(path, overrides=overrides, plugins=get_plugins())


def load_tokenizer(config: Config) -> Any:
    """The config's tokenizer, with `special_tokens`, `tokens` and chat template applied."""
    from sft.tokenizer import load_tokenizer as _load

    return _load(config)


def prepare_datasets(config: Config, tokenizer: Any = None) -> tuple[Any, Any | None]:
    """Prepared `(train, eval)` `datasets.Dataset`s with `input_ids` and `labels` columns.

    Uses the `dataset_prepared_path` cache when set; `eval` is None without an eval source.
    """
    from sft.data.pipeline import prepare_datasets as _prepare

    prepared = _prepare(config, tokenizer=tokenizer, show_progress=False)
    return prepared.train, prepared.eval


def train(config: Config) -> Any:
    """Fine-tune as the config says; returns a `RunResult` (output_dir, steps, final loss, ...)."""
    from sft.train.run import train as _train

    return _train(config)
