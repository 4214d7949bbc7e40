"""Batches for the Trainer: `Collator`, and `pad_id_of` the id it pads inputs with.

The collator completes the packed-row contract of `sft.data.packing`: positions restart at 0
for each sample and the first label of each sample is -100 (the packer sets both); the collator
pads the rows.
"""

from __future__ import annotations

from typing import Any

from sft.data.sample import IGNORE_INDEX


class Collator:
    """Pads a batch to its longest row (or `sequence_len`): pad id for inputs, -100 for labels.

    Plain samples get an `attention_mask`. Packed rows (with `position_ids`) get none: the
    restarting positions keep their samples apart; the padded tail is one more segment
    (positions from 0) that nothing real attends to. Labels are never derived from the pad id,
    so a tokenizer whose pad token is its EOS still trains the real EOS tokens.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = max(self.pad_to or 0, longest)
        batch = len(features)
        packed = "position_ids" in features[0]
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        if packed:
            positions = torch.zeros((batch, width), dtype=torch.long)
        else:
            attention = torch.zeros((batch, width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            labels[row, :n] = torch.as_tensor(feature["labels"])
            if packed:
                positions[row, :n] = torch.as_tensor(feature["position_ids"])
                positions[row, n:] = torch.arange(width - n)
            else:
                attention[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels}
        if packed:
            out["position_ids"] = positions
        else:
            out["attention_mask"] = attention
        return out


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads inputs: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
