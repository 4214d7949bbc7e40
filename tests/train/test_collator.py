"""The Collator: labels come from the samples only, never from the pad id."""

from __future__ import annotations

import torch

from sft.data.collate import Collator

IGNORE = -100
EOS = 2  # a tokenizer whose pad token is its EOS (Qwen, Llama 3 and the tiny test project)


def test_a_pad_id_equal_to_eos_keeps_the_eos_labels_of_plain_rows():
    features = [
        {"input_ids": [5, 6, 7, EOS], "labels": [IGNORE, IGNORE, 7, EOS]},
        {"input_ids": [8, EOS], "labels": [IGNORE, EOS]},
    ]
    batch = Collator(pad_id=EOS)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS], [8, EOS, EOS, EOS]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, EOS], [IGNORE, EOS, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_a_pad_id_equal_to_eos_keeps_the_eos_labels_of_packed_rows():
    features = [
        {
            "input_ids": [5, EOS, 6, 7, EOS],
            "labels": [IGNORE, EOS, IGNORE, 7, EOS],
            "position_ids": [0, 1, 0, 1, 2],
        },
        {"input_ids": [8, EOS], "labels": [IGNORE, EOS], "position_ids": [0, 1]},
    ]
    batch = Collator(pad_id=EOS, pad_to=6)(features)
    assert batch["labels"].tolist() == [
        [IGNORE, EOS, IGNORE, 7, EOS, IGNORE],
        [IGNORE, EOS, IGNORE, IGNORE, IGNORE, IGNORE],
    ]
    assert "attention_mask" not in batch
    assert torch.equal(
        batch["position_ids"], torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3]])
    )
