"""Span → label mapping: the fast Rust-encoding path equals the offsets reference."""

from __future__ import annotations

import random

from sft.data.sample import IGNORE_INDEX
from sft.data.tokenize import labels_from_encoding, labels_from_spans

TEXT = 'Grüße 👋🏽 — 日本語 and plain words, {"json": [1, 2]}\n\n<|im_end|> end'


def test_fast_path_matches_the_reference_on_random_spans():
    from sft.testing import build_tokenizer

    tokenizer = build_tokenizer(special_tokens=["<|im_end|>"])
    encoding = tokenizer.backend_tokenizer.encode(TEXT, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(len(TEXT) + 1), 4))
        spans = [(cuts[0], cuts[1]), (cuts[2], cuts[3])]
        spans = [s for s in spans if s[1] > s[0]]
        assert labels_from_encoding(encoding, spans) == labels_from_spans(
            encoding.ids, encoding.offsets, spans
        ), spans


def test_a_token_overlapping_a_span_edge_is_trained():
    ids, offsets = [1, 2, 3], [(0, 3), (3, 6), (6, 9)]
    assert labels_from_spans(ids, offsets, [(4, 5)]) == [IGNORE_INDEX, 2, IGNORE_INDEX]
    assert labels_from_spans(ids, offsets, [(2, 7)]) == [1, 2, 3]
    assert labels_from_spans([9, 1], [(0, 0), (0, 2)], [(0, 2)]) == [IGNORE_INDEX, 1]  # added BOS
