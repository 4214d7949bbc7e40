"""`type = "completion"`: raw text, every token trained; long texts split into chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, PromptStrategy
from sft.config.schema import key
from sft.data.sample import Rendered, require


@attrs.frozen
class CompletionKeys:
    field: str = key("text", doc="Completion: row field with the text.")


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    field = ds.section(CompletionKeys).field
    eos = tokenizer.eos_token or ""

    def render(row: dict[str, Any]) -> Rendered:
        text = str(require(row, field)) + eos
        return Rendered(
            text=text, spans=((0, len(text)),), add_special_tokens=True, split_long=True
        )

    return render


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(CompletionKeys, scope="dataset")]


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(
        PromptStrategy(
            "completion",
            _factory,
            "raw text (pretraining style) + EOS, all trained; texts longer than sequence_len are "
            "split into sequence_len chunks, never cut",
        )
    )
