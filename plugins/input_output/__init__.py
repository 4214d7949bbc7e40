"""`type = "input_output"`: template-free rows of text segments, each trained or not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sft import hookimpl
from sft.components import PromptStrategy
from sft.data.sample import Rendered, RowError, require


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    def render(row: dict[str, Any]) -> Rendered:
        segments = require(row, "segments", list)
        text = ""
        spans = []
        for index, segment in enumerate(segments):  # type: ignore[arg-type]
            where = f"segments[{index}]"
            if not isinstance(segment, dict):
                raise RowError("wrong type", f"{where} should be an object {{text, label}}", where)
            piece = segment.get("text")
            label = segment.get("label")
            if not isinstance(piece, str):
                raise RowError("wrong type", f"{where}.text should be a string", f"{where}.text")
            if not isinstance(label, bool):
                raise RowError(
                    "wrong type", f"{where}.label should be true or false", f"{where}.label"
                )
            if label and piece:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return Rendered(text=text, spans=tuple(spans), add_special_tokens=False)

    return render


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(
        PromptStrategy(
            "input_output",
            _factory,
            "template-free: rows of segments [{text, label}]; exactly the text written (no BOS/EOS "
            "added), segments with label = true trained",
        )
    )
