"""LoRA inputs that the backward pass rebuilds instead of keeping.

A lean op's output (an RMSNorm's, the SwiGLU product) is the input of the next linear layers,
and LoRA's A matrix keeps that input for its weight gradient: a second full-width activation
beside the op's own saved inputs. `remember(output, recompute, inputs)` registers how to rebuild
the output from tensors the lean op keeps anyway; `saving_recipes()` is entered around LoRA's
`x @ Aᵀ` only, and stores a saved tensor that is such an output, or a view of one, as its recipe,
rebuilt bit for bit when backward unpacks it. Every other tensor saved there goes to the hooks
that were active before (a profiler's, an offloader's), or is kept detached, with autograd's own
check that it was not modified in place.

An output is matched by its storage while the registered tensor is alive (so the storage
cannot have been freed and reused), and only at the version it was registered at; inputs
changed in place before backward are an error, as for autograd's own saved tensors.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
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


@attrs.frozen
class _Kept:
    tensor: Any
    version: int


@attrs.frozen
class _Outer:
    packed: Any


_ENTRIES: dict[int, _Entry] = {}


def _forget(key: int, output: weakref.ref) -> None:
    entry = _ENTRIES.get(key)
    if entry is not None and entry.output is output:
        del _ENTRIES[key]


def remember(output: Any, recompute: Callable[[], Any], inputs: Sequence[Any]) -> None:
    """`recompute()` rebuilds `output` from `inputs` (tensors kept for backward anyway). The
    entry lives as long as `output` does."""
    import torch

    # an output without grad (the first norm, over frozen embeddings) is still saved by LoRA
    if type(output) is not torch.Tensor or not torch.is_grad_enabled():
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

    # parameters, tensor subclasses (quantized, DTensor) and sparse tensors are never outputs
    if type(tensor) is not torch.Tensor or tensor.layout is not torch.strided:
        return None
    storage = tensor.untyped_storage()
    key = storage.data_ptr()
    entry = _ENTRIES.get(key)
    if entry is None or not entry.nbytes:
        return None
    output = entry.output()
    if (
        output is None
        or output.untyped_storage().data_ptr() != key  # `.data` or `set_` moved it since
        or output.device != tensor.device
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


def _keep(tensor: Any) -> _Kept:
    # detached: a tensor that saves itself would otherwise form a cycle through its grad_fn
    return _Kept(tensor.detach(), tensor._version)


def _unkeep(kept: _Kept) -> Any:
    if kept.tensor._version != kept.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{kept.tensor.dtype} {list(kept.tensor.shape)}] is at version "
            f"{kept.tensor._version}; expected version {kept.version} instead"
        )
    return kept.tensor


def _active_hooks() -> tuple[Callable[[Any], Any], Callable[[Any], Any]] | None:
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


def _hooks(outer: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None) -> tuple[Any, Any]:
    def pack(tensor: Any) -> Any:
        recipe = _recipe(tensor)
        if recipe is not None:
            return recipe
        return _keep(tensor) if outer is None else _Outer(outer[0](tensor))

    def unpack(packed: Any) -> Any:
        if isinstance(packed, _Recipe):
            return _rebuild(packed)
        if isinstance(packed, _Outer):
            return outer[1](packed.packed)  # type: ignore[index]
        return _unkeep(packed)

    return pack, unpack


@contextlib.contextmanager
def saving_recipes() -> Iterator[None]:
    """Tensors saved inside are stored as recipes where they are remembered outputs."""
    import torch

    with torch.autograd.graph.saved_tensors_hooks(*_hooks(_active_hooks())):
        yield
