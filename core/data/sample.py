"""What a prompt strategy produces for one row, and how it reports a bad row."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

Span = tuple[int, int]

IGNORE_INDEX = -100
"""The label of a token that is not trained (PyTorch cross-entropy's `ignore_index`)."""


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
    `notes` are facts worth counting in the summary of a kept row (e.g. "reasoning not
    rendered by the template"), one entry per occurrence.
    """

    text: str
    spans: tuple[Span, ...]
    add_special_tokens: bool = False
    split_long: bool = False
    turns: tuple[Turn, ...] = ()
    notes: tuple[str, ...] = ()


@attrs.frozen
class Tokenized:
    """A pre-tokenized row, already labelled (label -100 = not trained)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


Sample = Rendered | Tokenized


class RowError(Exception):
    """A malformed row. `reason` is the short label counted in summaries (e.g. "missing field").

    `key` names the dataset config key to blame when *every* row of a dataset fails this way
    (e.g. "message_property_mappings" for a mapped field no row has): the core then reports one
    config error on `datasets[i].<key>` instead of a data error per row.
    """

    def __init__(
        self, reason: str, message: str, field: str | None = None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        self.key = key


def require(
    row: dict, field: str, kinds: type | tuple[type, ...] = str, key: str | None = None
) -> object:
    """Read a required field of a row, raising `RowError` when missing or of the wrong type.

    `key` is the dataset config key that names `field` (e.g. "field_instruction"), blamed when
    no row of the dataset has the field.
    """
    if field not in row or row[field] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(
            "missing field", f"missing field {field!r} (fields present: {present})", field, key
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


def contract_problem(produced: object) -> str | None:
    """What is wrong with a prompt strategy's result for one row, or None when it keeps the
    contract: a `Rendered` or `Tokenized`, or a list of them."""
    samples = produced if isinstance(produced, list) else [produced]
    for sample in samples:
        if isinstance(sample, Rendered):
            if not isinstance(sample.text, str):
                return f"a Rendered whose text is {type(sample.text).__name__}, not str"
            for span in sample.spans:
                if (
                    not isinstance(span, tuple)
                    or len(span) != 2
                    or not all(isinstance(edge, int) for edge in span)
                    or not 0 <= span[0] <= span[1] <= len(sample.text)
                ):
                    return (
                        f"a Rendered with span {span!r}, which is not a (start, end) pair of "
                        f"character offsets within its text (0..{len(sample.text)})"
                    )
        elif isinstance(sample, Tokenized):
            if len(sample.input_ids) != len(sample.labels):
                return (
                    f"a Tokenized with {len(sample.input_ids)} input_ids and "
                    f"{len(sample.labels)} labels (they must be the same length)"
                )
        else:
            found = type(sample).__name__
            if isinstance(sample, dict):
                found += f" with keys {sorted(map(str, sample))}"
            return found
    return None
