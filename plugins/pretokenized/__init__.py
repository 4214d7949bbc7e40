"""Rows that are already tokenized (`input_ids`, optional `labels`/`attention_mask`).

Selected when a dataset has no `type` (or `type = "pretokenized"`). Rows are checked: ids are
integers inside the vocabulary, labels are ids or -100 and as long as input_ids; positions
with attention_mask 0 (padding) are removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sft import hookimpl
from sft.components import PromptStrategy
from sft.data.sample import IGNORE_INDEX, RowError, Tokenized, require


def _int_list(row: dict[str, Any], field: str) -> list[int]:
    values = require(row, field, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):  # type: ignore[union-attr]
        raise RowError("wrong type", f"field {field!r} should be a list of integers", field)
    return list(values)  # type: ignore[arg-type]


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Tokenized]:
    vocab = len(tokenizer)

    def render(row: dict[str, Any]) -> Tokenized:
        ids = _int_list(row, "input_ids")
        labels = _int_list(row, "labels") if row.get("labels") is not None else list(ids)
        mask = _int_list(row, "attention_mask") if row.get("attention_mask") is not None else None
        for field, values in (("labels", labels), ("attention_mask", mask)):
            if values is not None and len(values) != len(ids):
                raise RowError(
                    "wrong length",
                    f"{field} has {len(values)} entries but input_ids has {len(ids)}",
                    field,
                )
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise RowError(
                "bad token id",
                f"input_ids contains {bad}, outside the vocabulary (size {vocab})",
                "input_ids",
            )
        bad = next((x for x in labels if x != IGNORE_INDEX and not 0 <= x < vocab), None)
        if bad is not None:
            raise RowError("bad token id", f"labels contains {bad}; use ids or -100", "labels")
        if mask is not None:
            if any(m not in (0, 1) for m in mask):
                raise RowError(
                    "wrong type", "attention_mask should hold only 0 and 1", "attention_mask"
                )
            keep = [i for i, m in enumerate(mask) if m]
            ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
        return Tokenized(input_ids=tuple(ids), labels=tuple(labels))

    return render


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(
        PromptStrategy(
            "pretokenized",
            _factory,
            "rows with input_ids (+ labels, attention_mask), validated; selected when type is omitted",
        )
    )
