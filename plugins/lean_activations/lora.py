"""LoRA's update added into the base layer's output in place, forward and backward.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three full-width temporaries
(B's output, its scaled copy, the sum) per adapted linear. Here the base output takes
`scaling * (A x) Bᵀ` as one matrix-multiply-accumulate (`addmm_`): the same value to rounding,
the same tensors kept for backward (x for A's gradient, A x for B's), no full-width temporary.
With the base layer frozen (LoRA's own case), the backward does the same for x's gradient: the
frozen weight's product takes LoRA's share `(g B s) A` in place (`LoraLinear`), where autograd
would write it into a second full-width tensor and then add the two.

The input x is what A keeps for its gradient; where x is an RMSNorm's or the SwiGLU product's
output (`recompute`), it is stored as the recipe that rebuilds it.

Only the plain case: one active adapter, not merged, no DoRA or other variant, no dropout, no
LoRA bias, a `torch.nn.Linear` base, one dtype (autocast only to that dtype), no hooks on the
layers. Anything else
runs peft's own forward, call by call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from sft.plugins.lean_activations import recompute

_LEAN_CLASSES: dict[type, type] = {}


def _plain_case(layer: Any, x: Any) -> tuple[Any, Any, Any, float] | None:
    """(base, A, B, scaling) when `layer` is in the plain case for input `x`."""
    import torch

    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    (name,) = layer.active_adapters
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if type(base) is not torch.nn.Linear or type(lora_a) is not torch.nn.Linear:
        return None
    if type(lora_b) is not torch.nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (base, lora_a, lora_b)):
        return None
    if not x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        return None
    device = x.device.type
    # autocast to the dtype everything already has (a bf16 model under the Trainer's bf16
    # autocast) casts nothing: the in-place path holds
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
        return None
    return base, lora_a.weight, lora_b.weight, float(layer.scaling[name])


_FUNCTION: list[Any] = []


def _lora_linear() -> Any:
    """The autograd Function of a frozen linear layer plus its LoRA update (built on first use,
    so that importing the plugin does not import torch)."""
    if _FUNCTION:
        return _FUNCTION[0]
    import torch
    import torch.nn.functional as F

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, rows: Any, weight: Any, bias: Any, a: Any, b: Any, scaling: float
        ) -> Any:
            out = F.linear(rows, weight, bias)
            projected = F.linear(rows, a)
            out.addmm_(projected, b.t(), alpha=scaling)
            needs_a, needs_b = ctx.needs_input_grad[3:5]
            # x for A's gradient, A x for B's (x is the large one: not kept when A is frozen)
            ctx.save_for_backward(
                rows if needs_a else None, weight, a, b, projected if needs_b else None
            )
            ctx.scaling = scaling
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            # the ops autograd runs for F.linear + addmm_, with x's two shares summed in place
            rows, weight, a, b, projected = ctx.saved_tensors
            grad_rows = grad_a = grad_b = None
            needs_rows, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
            if needs_b:
                grad_b = grad.t().mm(projected).mul_(ctx.scaling)
            if needs_rows or needs_a:
                grad_projected = grad.mm(b).mul_(ctx.scaling)
                if needs_a:
                    grad_a = grad_projected.t().mm(rows)
                if needs_rows:
                    grad_rows = grad.mm(weight).addmm_(grad_projected, a)
            return grad_rows, None, None, grad_a, grad_b, None

    _FUNCTION.append(LoraLinear)
    return LoraLinear


def _lean_forward(peft_forward: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        import torch.nn.functional as F

        plain = None if args or kwargs else _plain_case(self, x)
        if plain is None:
            return peft_forward(self, x, *args, **kwargs)
        base, a, b, scaling = plain
        rows = x.reshape(-1, x.shape[-1])
        frozen = not base.weight.requires_grad and (
            base.bias is None or not base.bias.requires_grad
        )
        # A's input: rebuilt in backward where it can be
        saving = (
            recompute.saving_recipes()
            if getattr(self, "_sft_recipes", False)
            else contextlib.nullcontext()
        )
        if frozen and torch.is_grad_enabled():
            with saving:
                out = _lora_linear().apply(rows, base.weight, base.bias, a, b, scaling)
        else:
            out = F.linear(rows, base.weight, base.bias)
            with saving:
                projected = F.linear(rows, a)
            out.addmm_(projected, b.t(), alpha=scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


def patch_lora_layers(model: Any, recipes: bool) -> int:
    """Give peft's LoRA `Linear` layers in `model` the in-place forward; how many. `recipes`:
    A's input is stored as a recipe where it is a lean op's output."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return 0
    lean_classes = set(_LEAN_CLASSES.values())
    patched = 0
    for module in model.modules():
        kind = type(module)
        if kind in lean_classes or kind is Linear:
            if kind not in lean_classes:
                if kind not in _LEAN_CLASSES:
                    body = {"forward": _lean_forward(kind.forward)}
                    lean = type(kind.__name__, (kind,), body)
                    lean.__module__, lean.__qualname__ = kind.__module__, kind.__qualname__
                    _LEAN_CLASSES[kind] = lean
                module.__class__ = _LEAN_CLASSES[kind]
            module._sft_recipes = recipes
            patched += 1
    return patched
