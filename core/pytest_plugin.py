"""pytest fixtures for plugin authors, loaded by pytest through the `pytest11` entry point.

With sft installed, a plugin's own tests can use, without any conftest:

- `sft_plugins`: the installed plugins, freshly loaded (no `SFT_*` variables), as the
  process-wide set for the test; register an in-process plugin with
  `sft_plugins.register(obj, name="mine")`.
- `sft_tokenizer`: a tiny byte-level BPE tokenizer with a ChatML template (`<|im_start|>`,
  `<|im_end|>` as EOS and pad), built offline in well under a second.
- `sft_model_dir`: a directory holding a tiny random Llama-style model and that tokenizer,
  usable as `base_model` for a real training run of a few seconds.
- `sft_config`: builds a validated `Config` from TOML text: `base_model` defaults to
  `sft_model_dir`, `{tmp}` is replaced by the test's temporary directory, and `rows=` writes
  a JSONL file `{tmp}/data.jsonl` first.
- `sft_prepare`: `sft_prepare(config)` prepares the config's datasets with the tokenizer of
  its `base_model` and returns the training rows (`input_ids`, `labels`).

The fixtures import torch and transformers only when a test asks for them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sft.config.schema import Config
    from sft.manager import SftPlugins


@pytest.fixture
def sft_plugins() -> Iterator[SftPlugins]:
    """The installed plugins, freshly loaded, set as the process-wide plugins for one test."""
    from sft.manager import SftPlugins, set_plugins

    loaded = SftPlugins.load(environ={})
    set_plugins(loaded)
    yield loaded
    set_plugins(None)


@pytest.fixture(scope="session")
def sft_tokenizer() -> Any:
    """A tiny ChatML tokenizer (EOS and pad `<|im_end|>`)."""
    from sft.testing import CHATML_TEMPLATE, build_tokenizer

    return build_tokenizer(
        chat_template=CHATML_TEMPLATE,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory: pytest.TempPathFactory, sft_tokenizer: Any) -> Path:
    """A tiny random Llama-style model saved with `sft_tokenizer`: a `base_model` path."""
    from sft.testing import build_model

    directory = tmp_path_factory.mktemp("sft-tiny-model")
    build_model(sft_tokenizer).save_pretrained(directory)
    sft_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def sft_config(
    sft_plugins: SftPlugins, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., Config]:
    """`sft_config(text, *overrides, rows=None, machine_checks=True)` → a validated Config."""
    from sft.config import load_config_text

    def make(
        text: str = "",
        *overrides: str,
        rows: Sequence[dict[str, Any]] | None = None,
        machine_checks: bool = True,
    ) -> Config:
        if rows is not None:
            with (tmp_path / "data.jsonl").open("w", encoding="utf-8") as file:
                file.writelines(json.dumps(row) + "\n" for row in rows)
        body = text.replace("{tmp}", str(tmp_path))
        if not any(line.strip().startswith("base_model") for line in body.splitlines()):
            model = request.getfixturevalue("sft_model_dir")
            body = f'base_model = "{model}"\n' + body
        return load_config_text(
            body,
            overrides=list(overrides),
            plugins=sft_plugins,
            source=str(tmp_path / "config.toml"),
            machine_checks=machine_checks,
        )

    return make


@pytest.fixture
def sft_prepare(sft_plugins: SftPlugins) -> Callable[[Config], Any]:
    """`sft_prepare(config)` → the prepared training rows (a `datasets.Dataset`)."""
    from sft.data.pipeline import prepare_datasets
    from sft.tokenizer import load_tokenizer

    def prepare(config: Config) -> Any:
        tokenizer = load_tokenizer(config, plugins=sft_plugins)
        return prepare_datasets(
            config, tokenizer=tokenizer, plugins=sft_plugins, show_progress=False
        ).train

    return prepare
