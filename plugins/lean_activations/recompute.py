"""Outputs that the backward pass recomputes instead of keeping.

A lean op's output (an RMSNorm's, the SwiGLU product) is the input of the next linear layers,
and LoRA keeps that input for its weight gradient: a second full-width activation beside the
op's own saved inputs. `remember(output, recompute)` registers how to rebuild the output from
tensors that stay saved anyway; while `Recomputing` is active (a `saved_tensors_hooks` pair,
entered around the model's forward) a saved tensor that is such an output, or a view of one,
is stored as that recipe, and rebuilt bit for bit when backward unpacks it.

An output is matched by its storage while the registered tensor is alive (so the storage
cannot have been freed and reused), and only at the version it was registered at: an output
changed in place since is kept as usual. Inputs changed in place before backward are an error,
as autograd's own saved tensors are.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import attrs


@attrs.frozen
class _Entry:
    output: weakref.ref
    recompute: Callable[[], Any]
    inputs: Sequence[Any]
    versions: tuple[int, ...]
    version: int
    nbytes: int


@attrs.frozen
class _Recipe:
    entry: _Entry
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


_ENTRIES: dict[int, _Entry] = {}


def _forget(key: int, output: weakref.ref) -> None:
    entry = _ENTRIES.get(key)
    if entry is not None and entry.output is output:
        del _ENTRIES[key]


def remember(output: Any, recompute: Callable[[], Any], inputs: Sequence[Any]) -> None:
    """`recompute()` rebuilds `output` from `inputs` (tensors kept for backward anyway)."""
    import torch

    if _DEPTH[0] <= 0 or type(output) is not torch.Tensor or not output.requires_grad:
        return
    storage = output.untyped_storage()
    key = storage.data_ptr()
    ref = weakref.ref(output, functools.partial(_forget, key))
    _ENTRIES[key] = _Entry(
        ref,
        recompute,
        tuple(inputs),
        tuple(t._version for t in inputs),
        output._version,
        storage.nbytes(),
    )


def _recipe(tensor: Any) -> _Recipe | None:
    import torch

    if type(tensor) is not torch.Tensor:  # parameters, tensor subclasses (quantized, DTensor)
        return None
    storage = tensor.untyped_storage()
    entry = _ENTRIES.get(storage.data_ptr())
    if entry is None:
        return None
    output = entry.output()
    if (
        output is None
        or entry.nbytes != storage.nbytes()
        or tensor._version != entry.version
        or tensor.dtype != output.dtype
    ):
        return None
    return _Recipe(entry, tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset()))


def _rebuild(packed: _Recipe) -> Any:
    import torch

    entry = packed.entry
    if tuple(t._version for t in entry.inputs) != entry.versions:
        raise RuntimeError(
            "lean_activations: a tensor needed to recompute an activation in backward was "
            "modified in place after the forward (set lean_activations = false for this model)"
        )
    with torch.no_grad():
        full = entry.recompute()
    return full.as_strided(packed.shape, packed.stride, packed.offset)


@attrs.frozen
class _Outer:
    packed: Any


def _hooks(outer: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None) -> tuple[Any, Any]:
    """Pack/unpack functions: registered outputs become recipes; every other tensor goes to the
    hooks that were active when the forward began (a profiler's, an offloader's), if any."""

    def pack(tensor: Any) -> Any:
        recipe = _recipe(tensor)
        if recipe is not None:
            return recipe
        return tensor if outer is None else _Outer(outer[0](tensor))

    def unpack(packed: Any) -> Any:
        if isinstance(packed, _Recipe):
            return _rebuild(packed)
        return packed if outer is None else outer[1](packed.packed)

    return pack, unpack


def _active_hooks() -> tuple[Callable[[Any], Any], Callable[[Any], Any]] | None:
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


_DEPTH = [0]
_CONTEXTS: list[Any] = []


def enter(*_: Any) -> None:
    """Forward pre-hook: saved tensors that are registered outputs become recipes."""
    import torch

    context = torch.autograd.graph.saved_tensors_hooks(*_hooks(_active_hooks()))
    context.__enter__()
    _CONTEXTS.append(context)
    _DEPTH[0] += 1


def leave(*_: Any) -> None:
    """Forward hook (always called)."""
    _DEPTH[0] -= 1
    _CONTEXTS.pop().__exit__(None, None, None)
    if _DEPTH[0] == 0:
        _ENTRIES.clear()
