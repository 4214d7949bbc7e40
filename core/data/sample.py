"""What a prompt strategy produces for one row, and how it reports a bad row."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

Span = tuple[int, int]


@attrs.frozen
class Turn:
    """One rendered message, for `preprocess --debug`'s self-check and view."""

    role: str
    start: int
    end: int
    trainable: bool
    end_marker: Span | None = None


@attrs.frozen
class Rendered:
    """A row rendered to text, with the character spans whose tokens are trained.

    The core tokenises `text` (in batches, with offsets) and labels every token that overlaps a
    span; all other tokens get label -100. `add_special_tokens` asks the tokenizer to add its
    own BOS/EOS (templates that write them into the text leave it False). `split_long` lets
    the core cut a long text into `sequence_len` chunks instead of dropping or truncating it.
    """

    text: str
    spans: tuple[Span, ...]
    add_special_tokens: bool = False
    split_long: bool = False
    turns: tuple[Turn, ...] = ()


@attrs.frozen
class Tokenized:
    """A pre-tokenized row, already labelled (label -100 = not trained)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


Sample = Rendered | Tokenized


class RowError(Exception):
    """A malformed row. `reason` is the short label counted in summaries (e.g. "missing field")."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


def require(row: dict, field: str, kinds: type | tuple[type, ...] = str) -> object:
    """Read a required field of a row, raising `RowError` when missing or of the wrong type."""
    if field not in row or row[field] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(
            "missing field", f"missing field {field!r} (fields present: {present})", field
        )
    value = row[field]
    if not isinstance(value, kinds):
        expected = (
            kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        )
        raise RowError(
            "wrong type",
            f"field {field!r} should be {expected}, found {type(value).__name__}",
            field,
        )
    return value


def merge_spans(spans: Sequence[Span]) -> tuple[Span, ...]:
    """Sorted, non-overlapping, non-empty spans."""
    merged: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((a, b) for a, b in merged)
