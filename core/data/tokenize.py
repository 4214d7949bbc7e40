"""Batched tokenising of rendered rows and the labels that follow from their trainable spans.

Runs in worker processes (forked, so the render function and tokenizer are inherited, not
pickled); everything returned is plain lists of ints and counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft.data.sample import Rendered, RowError, Tokenized

IGNORE = -100


@attrs.frozen
class TokenizeOptions:
    sequence_len: int
    excess_length_strategy: str
    invalid_rows: str
    train_on_inputs: bool


@attrs.define
class ChunkResult:
    input_ids: list[list[int]] = attrs.field(factory=list)
    labels: list[list[int]] = attrs.field(factory=list)
    sources: list[int] = attrs.field(factory=list)  # row index each sample came from
    dropped: Counter[str] = attrs.field(factory=Counter)
    error: tuple[int, str, str, str | None] | None = None  # (row index, reason, message, field)


def labels_from_spans(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
) -> list[int]:
    """Label each token overlapping a trainable character span with its id, others -100."""
    labels = [IGNORE] * len(input_ids)
    if not spans:
        return labels
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        if end <= start:
            continue  # tokens the tokenizer added (BOS) have no characters
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if start < span_end and end > span_start:
            labels[position] = input_ids[position]
    return labels


def _finish(
    ids: list[int],
    labels: list[int],
    split_long: bool,
    opts: TokenizeOptions,
    out: ChunkResult,
    source: int,
) -> None:
    limit = opts.sequence_len
    pieces = [(ids, labels)]
    if len(ids) > limit:
        if split_long:
            pieces = [
                (ids[i : i + limit], labels[i : i + limit]) for i in range(0, len(ids), limit)
            ]
        elif opts.excess_length_strategy == "truncate":
            pieces = [(ids[:limit], labels[:limit])]
        elif opts.excess_length_strategy == "raise":
            out.error = (
                source,
                "too long",
                f"{len(ids)} tokens, longer than sequence_len = {limit}",
                None,
            )
            return
        else:
            out.dropped["longer than sequence_len"] += 1
            return
    for piece_ids, piece_labels in pieces:
        if opts.train_on_inputs:
            piece_labels = list(piece_ids)
        if all(label == IGNORE for label in piece_labels):
            out.dropped["no trainable tokens"] += 1
            continue
        out.input_ids.append(list(piece_ids))
        out.labels.append(list(piece_labels))
        out.sources.append(source)


def process_chunk(
    rows: Sequence[dict[str, Any]],
    first_index: int,
    render: Callable[[dict[str, Any]], Any],
    tokenizer: Any,
    opts: TokenizeOptions,
) -> ChunkResult:
    """Render, tokenise and label a chunk of rows (indices `first_index...`)."""
    out = ChunkResult()
    rendered: list[tuple[int, Rendered]] = []
    for offset, row in enumerate(rows):
        index = first_index + offset
        try:
            produced = render(row)
        except RowError as exc:
            if opts.invalid_rows == "raise":
                out.error = (index, exc.reason, exc.message, exc.field)
                return out
            out.dropped[exc.reason] += 1
            continue
        for sample in produced if isinstance(produced, list) else [produced]:
            if isinstance(sample, Tokenized):
                _finish(list(sample.input_ids), list(sample.labels), False, opts, out, index)
            else:
                rendered.append((index, sample))
        if out.error:
            return out
    for add_special in (False, True):
        group = [(i, r) for i, r in rendered if r.add_special_tokens is add_special]
        if not group:
            continue
        encoded = tokenizer(
            [r.text for _, r in group],
            add_special_tokens=add_special,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )
        for (index, sample), ids, offsets in zip(
            group, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            labels = labels_from_spans(ids, offsets, sample.spans)
            _finish(ids, labels, sample.split_long, opts, out, index)
            if out.error:
                return out
    return out
