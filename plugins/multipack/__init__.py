"""`sample_packing = true`: lengths-only bin packing (first-fit decreasing, or first fit in
dataset order with `sample_packing_sequentially`), each bin holding at most `sequence_len`
tokens and `sample_packing_bin_size` samples.

First fit over bins is a search for the first bin with enough room; a segment tree over the
bins' free space finds it in O(log bins), so a million lengths pack in seconds in pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sft import hookimpl
from sft.components import Packer


def first_fit(
    lengths: Sequence[int], capacity: int, max_items: int, decreasing: bool = True
) -> list[list[int]]:
    """Pack item indices into bins of `capacity` tokens and at most `max_items` items."""
    n = len(lengths)
    if n == 0:
        return []
    too_long = next((i for i in range(n) if lengths[i] > capacity), None)
    if too_long is not None:
        raise ValueError(
            f"sample {too_long} has {lengths[too_long]} tokens, more than a bin's {capacity}"
        )
    if decreasing:
        order = sorted(range(n), key=lengths.__getitem__, reverse=True)
    else:
        order = list(range(n))
    size = 1
    while size < n:  # at most n bins are ever opened
        size *= 2
    # tree[size + b] = free space of bin b (bins not yet opened have full capacity);
    # internal nodes hold the max of their children.
    tree = [capacity] * (2 * size)
    counts = [0] * size
    bins: list[list[int]] = []
    for item in order:
        need = lengths[item]
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        counts[b] += 1
        free = tree[node] - need
        tree[node] = free if counts[b] < max_items else -1
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node //= 2
    return bins


def pack(lengths: Sequence[int], capacity: int, config: Any, epoch: int = 0) -> list[list[int]]:
    max_items = getattr(config, "sample_packing_bin_size", 200)
    sequential = bool(getattr(config, "sample_packing_sequentially", False))
    bins = first_fit(lengths, capacity, max_items, decreasing=not sequential)
    for items in bins:
        items.sort()  # within a bin keep dataset order (any order is equivalent; this is stable)
    return bins


@hookimpl
def sft_register_packers(register: Callable[[Packer], None]) -> None:
    register(
        Packer(
            "multipack",
            pack,
            "first-fit decreasing bin packing on lengths (or first fit in order); bins shuffled per epoch",
        )
    )
