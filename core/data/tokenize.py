"""Batched tokenising of rendered rows and the labels that follow from their trainable spans.

Runs in worker processes (forked, so the render function and tokenizer are inherited, not
pickled); everything returned is plain lists of ints and counters.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from sft.data.sample import IGNORE_INDEX, Rendered, RowError, Tokenized, contract_problem


@attrs.frozen
class TokenizeOptions:
    sequence_len: int
    excess_length_strategy: str
    invalid_rows: str
    train_on_inputs: bool
    min_sample_len: int = 0


MAX_REPORTED_ERRORS = 5


@attrs.frozen
class RowProblem:
    """A row that could not be prepared: where, why, and the config key to blame if any."""

    index: int  # into the source's rows
    reason: str
    message: str
    field: str | None = None
    key: str | None = None


@attrs.define
class ChunkResult:
    input_ids: list[list[int]] = attrs.field(factory=list)
    labels: list[list[int]] = attrs.field(factory=list)
    sources: list[int] = attrs.field(factory=list)  # row index each sample came from
    dropped: Counter[str] = attrs.field(factory=Counter)
    notes: Counter[str] = attrs.field(factory=Counter)  # Rendered.notes of the rows processed
    errors: list[RowProblem] = attrs.field(factory=list)  # the first few, under "raise"
    error_count: int = 0
    blamed: Counter[str] = attrs.field(factory=Counter)  # failed rows per config key to blame
    blamed_example: dict[str, RowProblem] = attrs.field(factory=dict)  # the first, per key
    # The first row a prompt strategy broke its contract on (a plugin bug, not a data one).
    contract: RowProblem | None = None

    def add_error(self, problem: RowProblem) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(problem)

    def merge(self, other: ChunkResult) -> None:
        """Append `other` (a later chunk) to this result."""
        self.input_ids.extend(other.input_ids)
        self.labels.extend(other.labels)
        self.sources.extend(other.sources)
        self.dropped.update(other.dropped)
        self.notes.update(other.notes)
        self.blamed.update(other.blamed)
        for key, problem in other.blamed_example.items():
            self.blamed_example.setdefault(key, problem)
        self.contract = self.contract or other.contract
        self.error_count += other.error_count
        room = MAX_REPORTED_ERRORS - len(self.errors)
        self.errors.extend(other.errors[: max(0, room)])


def labels_from_spans(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
) -> list[int]:
    """Label each token overlapping a trainable character span with its id, others -100."""
    labels = [IGNORE_INDEX] * len(input_ids)
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


def labels_from_encoding(
    encoding: Any, spans: Sequence[tuple[int, int]], ids: list[int] | None = None
) -> list[int]:
    """`labels_from_spans` through the Rust encoding's char → token map (O(spans), not O(tokens)).

    `ids` is `encoding.ids` when the caller has it already (each read builds a new list).
    """
    if ids is None:
        ids = encoding.ids
    labels = [IGNORE_INDEX] * len(ids)
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


def cut_special_token(
    text: str,
    ids: Sequence[int],
    token_chars: Callable[[int], tuple[int, int] | None],
    char_token: Callable[[int], int | None],
    spans: Sequence[tuple[int, int]],
    special_ids: frozenset[int],
) -> tuple[int, int] | None:
    """The characters of a special (added) token that a span starts or ends inside, if any.

    Ordinary tokens are widened silently (a character can span several byte-level tokens), but
    a special token is a marker: a span edge inside one means the strategy's idea of where a
    turn ends does not match the text, and training all or none of it would be a guess.
    Whitespace a token absorbs around its text (`lstrip`/`rstrip`) is not part of it.
    """
    for start, end in spans:
        for position, edge in ((start, start), (end - 1, end)):
            token = char_token(position)
            if token is None or ids[token] not in special_ids:
                continue
            chars = token_chars(token)
            if chars is None:
                continue
            piece = text[chars[0] : chars[1]]
            first = chars[0] + len(piece) - len(piece.lstrip())
            last = chars[1] - (len(piece) - len(piece.rstrip()))
            if first < edge < last:
                return first, last
    return None


def _offsets_lookup(
    offsets: Sequence[tuple[int, int]],
) -> tuple[Callable[[int], tuple[int, int] | None], Callable[[int], int | None]]:
    """`cut_special_token`'s lookups over a Python tokenizer's offset mapping."""
    starts = [start for start, _ in offsets]

    def char_token(position: int) -> int | None:
        index = bisect.bisect_right(starts, position) - 1
        while index >= 0 and offsets[index][1] <= offsets[index][0]:
            index -= 1  # tokens with no characters (BOS)
        if index < 0 or not offsets[index][0] <= position < offsets[index][1]:
            return None
        return index

    return (lambda index: tuple(offsets[index])), char_token  # type: ignore[return-value]


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
            out.add_error(
                RowProblem(
                    source, "too long", f"{len(ids)} tokens, longer than sequence_len = {limit}"
                )
            )
            return
        else:
            out.dropped["longer than sequence_len"] += 1
            return
    for piece_ids, piece_labels in pieces:
        if len(piece_ids) < opts.min_sample_len:
            out.dropped["shorter than min_sample_len"] += 1
            continue
        if opts.train_on_inputs and not explicit_labels:
            piece_labels = list(piece_ids)
        if piece_labels.count(IGNORE_INDEX) == len(piece_labels):
            out.dropped["no trainable tokens"] += 1
            continue
        out.input_ids.append(piece_ids)  # the caller's own lists: kept, not copied
        out.labels.append(piece_labels)
        out.sources.append(source)


def check_text(produced: Any, row: dict[str, Any]) -> None:
    """Raise `RowError` for rendered text that is not valid Unicode, before batch encoding.

    A lone surrogate (`"\\ud800"` in a JSON string) passes `json.loads` and the template, but
    the Rust tokenizer refuses it with a `TypeError` for the whole batch; found here, it is one
    bad row. ASCII text (the common case) is accepted without encoding it.
    """
    for sample in produced if isinstance(produced, list) else [produced]:
        if not isinstance(sample, Rendered) or sample.text.isascii():
            continue
        try:
            sample.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            found = ascii(sample.text[exc.start])
            raise RowError(
                "invalid text",
                f"the text holds a lone surrogate {found}, which is not Unicode text",
                _surrogate_field(row),
            ) from None


def _surrogate_field(row: dict[str, Any]) -> str | None:
    """The path (`messages[1].content`) of the first string of `row` holding a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", row)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or None
        elif isinstance(value, dict):
            keys = [f"{where}.{k}" if where else str(k) for k in value]
            stack.extend(reversed(list(zip(keys, value.values(), strict=True))))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)]))
    return None


def process_chunk(
    rows: Sequence[dict[str, Any]],
    first_index: int,
    render: Callable[[dict[str, Any]], Any],
    tokenizer: Any,
    opts: TokenizeOptions,
) -> ChunkResult:
    """Render, tokenise and label a chunk of rows (indices `first_index...`).

    Under `invalid_rows = "raise"` a bad row does not stop the chunk: every row is still
    checked, so the error can say how many rows fail and show the first few.
    """
    out = ChunkResult()
    rendered: list[tuple[int, Rendered]] = []
    for offset, row in enumerate(rows):
        index = first_index + offset
        try:
            produced = render(row)
            if broken := contract_problem(produced):
                if out.contract is None:
                    who = getattr(render, "strategy", "the prompt strategy")
                    out.contract = RowProblem(index, "plugin contract", f"{who} returned {broken}")
                continue
            check_text(produced, row)
        except RowError as exc:
            problem = RowProblem(index, exc.reason, exc.message, exc.field, exc.key)
            if exc.key:
                out.blamed[exc.key] += 1
                out.blamed_example.setdefault(exc.key, problem)
            if opts.invalid_rows == "raise":
                out.add_error(problem)
            else:
                out.dropped[exc.reason] += 1
            continue
        except Exception as exc:  # a strategy bug or a row it did not anticipate: name the row
            who = getattr(render, "strategy", "the prompt strategy")
            out.add_error(
                RowProblem(index, "strategy error", f"{who} raised {type(exc).__name__}: {exc}")
            )
            continue
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
                out.notes.update(sample.notes)
                rendered.append((index, sample))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(tokenizer, "added_tokens_decoder", None)  # a method on mistral-common's
    special_ids = frozenset(decoder) if isinstance(decoder, Mapping) else frozenset()
    for add_special in (False, True):
        group = [(i, r) for i, r in rendered if r.add_special_tokens is add_special]
        if not group:
            continue
        texts = [r.text for _, r in group]
        pairs: list[tuple[Sequence[int], list[int], tuple[int, int] | None]] = []
        if backend is not None:  # the Rust tokenizer directly: the same ids, less overhead
            for encoding, (_, sample) in zip(
                backend.encode_batch(texts, add_special_tokens=add_special), group, strict=True
            ):
                ids = encoding.ids
                cut = cut_special_token(
                    sample.text,
                    ids,
                    encoding.token_to_chars,
                    encoding.char_to_token,
                    sample.spans,
                    special_ids,
                )
                pairs.append((ids, labels_from_encoding(encoding, sample.spans, ids), cut))
        else:
            encoded = tokenizer(
                texts, add_special_tokens=add_special, return_offsets_mapping=True, verbose=False
            )
            for ids, offsets, (_, sample) in zip(
                encoded["input_ids"], encoded["offset_mapping"], group, strict=True
            ):
                cut = cut_special_token(
                    sample.text, ids, *_offsets_lookup(offsets), sample.spans, special_ids
                )
                pairs.append((ids, labels_from_spans(ids, offsets, sample.spans), cut))
        for (index, sample), (ids, labels, cut) in zip(group, pairs, strict=True):
            if cut is not None:
                who = getattr(render, "strategy", "the prompt strategy")
                problem = RowProblem(
                    index,
                    "labels cut a special token",
                    f"{who} marks a trained span that starts or ends inside the special token "
                    f"{sample.text[cut[0] : cut[1]]!r} (characters {cut[0]}..{cut[1]}), so "
                    "whether it is trained would be a guess. With a chat template, the template "
                    "writes text that both ends one turn and starts the next; see the row with "
                    "`sft preprocess --debug`, and set eot_tokens or use another template",
                )
                if opts.invalid_rows == "raise":
                    out.add_error(problem)
                else:
                    out.dropped[problem.reason] += 1
                continue
            _finish(list(ids), labels, sample.split_long, opts, out, index)
    return out
