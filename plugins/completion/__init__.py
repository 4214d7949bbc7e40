"""`type = "completion"`: raw text, every token trained; long texts split into chunks.

`type = "pretrain"` is the same for Axolotl's `pretraining_dataset` entries, which name the
text field `text_column`.
"""

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


@attrs.frozen
class PretrainKeys:
    text_column: str = key(
        "text", doc="Pretrain (Axolotl's pretraining_dataset): row field with the text."
    )


def _render_text(field: str, tokenizer: Any) -> Callable[[dict[str, Any]], Rendered]:
    eos = tokenizer.eos_token or ""

    def render(row: dict[str, Any]) -> Rendered:
        text = str(require(row, field)) + eos
        return Rendered(
            text=text, spans=((0, len(text)),), add_special_tokens=True, split_long=True
        )

    return render


def _completion(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    return _render_text(ds.section(CompletionKeys).field, tokenizer)


def _pretrain(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    return _render_text(ds.section(PretrainKeys).text_column, tokenizer)


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [
        ConfigKeys(CompletionKeys, scope="dataset", dataset_types=("completion",)),
        ConfigKeys(PretrainKeys, scope="dataset", dataset_types=("pretrain",)),
    ]


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(
        PromptStrategy(
            "completion",
            _completion,
            "raw text (pretraining style) + EOS, all trained; texts longer than sequence_len are "
            "split into sequence_len chunks, never cut",
        )
    )
    register(
        PromptStrategy(
            "pretrain",
            _pretrain,
            "Axolotl's pretraining text (`text_column`) + EOS, all trained; long texts split into "
            "sequence_len chunks without overlap (Axolotl's windows overlap by up to 256 tokens)",
        )
    )
