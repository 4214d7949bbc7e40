"""Sample packing: bins of samples as training rows whose samples cannot see each other.

A packed row concatenates its samples; `position_ids` restart at 0 for each sample and no
`attention_mask` is passed, which makes transformers build a block-diagonal causal mask for
sdpa/eager/flex and varlen `cu_seqlens` for flash-attn (transformers' packed-sequence path;
the invariant tests check per-token loss and gradients against the samples run one by one).
The first label of every sample is -100, so no token is trained to predict across a boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from sft.data.sample import IGNORE_INDEX

if TYPE_CHECKING:
    from sft.config.schema import Config
    from sft.data.pipeline import Prepared
    from sft.manager import SftPlugins


@attrs.frozen
class PackingStats:
    samples: int
    bins: int
    tokens: int
    capacity: int

    @property
    def efficiency(self) -> float:
        return self.tokens / (self.bins * self.capacity) if self.bins else 0.0

    def render(self) -> str:
        return (
            f"{self.samples} samples → {self.bins} packed rows of ≤ {self.capacity} tokens, "
            f"packing efficiency {self.efficiency:.2%}"
        )


def sample_lengths(dataset: Any) -> list[int]:
    """Token counts of every sample, read from Arrow without materialising the ids."""
    import pyarrow.compute as pc

    column = dataset.data.column("input_ids")
    return pc.list_value_length(column).to_pylist()


class PackedDataset:
    """A map-style dataset whose items are bins of samples of `base`."""

    def __init__(self, base: Any, bins: list[list[int]]) -> None:
        self.base = base
        self.bins = bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        rows = self.base[self.bins[index]]  # one Arrow read for the whole bin
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for ids, sample_labels in zip(rows["input_ids"], rows["labels"], strict=True):
            input_ids.extend(ids)
            labels.append(
                IGNORE_INDEX
            )  # never predict this sample's first token from the previous one
            labels.extend(sample_labels[1:])
            positions.extend(range(len(ids)))
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def pack_dataset(
    dataset: Any, capacity: int, config: Any, plugins: SftPlugins
) -> tuple[PackedDataset, PackingStats]:
    packer = plugins.packers().get(config.sample_packer)
    lengths = sample_lengths(dataset)
    bins = [list(b) for b in packer.pack(lengths, capacity, config, 0)]
    stats = PackingStats(
        samples=len(lengths), bins=len(bins), tokens=sum(lengths), capacity=capacity
    )
    return PackedDataset(dataset, bins), stats


def pack_prepared(
    config: Config, prepared: Prepared, plugins: SftPlugins, console: Any
) -> tuple[Any, Any]:
    """Packed views of the prepared data when `sample_packing` is on (eval: `eval_sample_packing`),
    with the packing statistics printed: what `sft run` trains on and `sft preprocess` reports."""
    if not config.sample_packing:
        return prepared.train, prepared.eval
    train_data = prepared.train  # a stream packs as it reads (sft.data.streaming)
    if not config.streaming:
        train_data, stats = pack_dataset(prepared.train, config.sequence_len, config, plugins)
        console.print(f"packing: {stats.render()}")
    eval_data = prepared.eval
    eval_packing = (
        config.sample_packing if config.eval_sample_packing is None else config.eval_sample_packing
    )
    if eval_data is not None and eval_packing:
        if sum(sample_lengths(eval_data)) < config.sequence_len:
            console.print(
                f"notice: the eval set ({len(eval_data)} samples) does not fill one packed row of "
                f"{config.sequence_len} tokens; evaluating it unpacked"
            )
        else:
            eval_data, eval_stats = pack_dataset(eval_data, config.sequence_len, config, plugins)
            console.print(f"eval packing: {eval_stats.render()}")
    return train_data, eval_data
