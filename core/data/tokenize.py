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


def labels_from_encoding(encoding: Any, spans: Sequence[tuple[int, int]]) -> list[int]:
    """`labels_from_spans` through the Rust encoding's char → token map (O(spans), not O(tokens))."""
    ids = encoding.ids
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        first = encoding.char_to_token(start)
        last = encoding.char_to_token(end - 1)
        if first is None or last is None:  # a span edge on a character no token covers
            return labels_from_spans(ids, encoding.offsets, spans)
        # A character split over several byte-level tokens maps to one of them: widen.
        while first > 0 and _token_end(encoding, first - 1) > start:
            first -= 1
        while last + 1 < len(ids) and _token_start(encoding, last + 1) < end:
            last += 1
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def _token_start(encoding: Any, index: int) -> int:
    chars = encoding.token_to_chars(index)
    return chars[0] if chars and chars[1] > chars[0] else 1 << 62


def _token_end(encoding: Any, index: int) -> int:
    chars = encoding.token_to_chars(index)
    return chars[1] if chars and chars[1] > chars[0] else -1


def _finish(
    ids: list[int],
    labels: list[int],
    split_long: bool,
    opts: TokenizeOptions,
    out: ChunkResult,
    source: int,
    explicit_labels: bool = False,
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
        if opts.train_on_inputs and not explicit_labels:
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
        except Exception as exc:  # a strategy bug or a row it did not anticipate: name the row
            out.error = (
                index,
                "strategy error",
                f"the prompt strategy failed: {type(exc).__name__}: {exc}",
                None,
            )
            return out
        for sample in produced if isinstance(produced, list) else [produced]:
            if isinstance(sample, Tokenized):
                _finish(
                    list(sample.input_ids),
                    list(sample.labels),
                    False,
                    opts,
                    out,
                    index,
                    explicit_labels=True,
                )
            else:
                rendered.append((index, sample))
        if out.error:
            return out
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for add_special in (False, True):
        group = [(i, r) for i, r in rendered if r.add_special_tokens is add_special]
        if not group:
            continue
        texts = [r.text for _, r in group]
        if backend is not None:  # the Rust tokenizer directly: the same ids, less overhead
            encodings = backend.encode_batch(texts, add_special_tokens=add_special)
            pairs = [
                (e.ids, labels_from_encoding(e, s.spans))
                for e, (_, s) in zip(encodings, group, strict=True)
            ]
        else:
            encoded = tokenizer(
                texts, add_special_tokens=add_special, return_offsets_mapping=True, verbose=False
            )
            pairs = [
                (ids, labels_from_spans(ids, offsets, s.spans))
                for ids, offsets, (_, s) in zip(
                    encoded["input_ids"], encoded["offset_mapping"], group, strict=True
                )
            ]
        for (index, sample), (ids, labels) in zip(group, pairs, strict=True):
            _finish(list(ids), labels, sample.split_long, opts, out, index)
            if out.error:
                return out
    return out
