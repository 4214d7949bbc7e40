"""Fake quantization sft writes itself, where torchao's QAT layers do not serve: NVFP4 on any
device, and Axolotl's ternary (BitNet b1.58) QAT.

torchao's NVFP4 QAT layer computes its forward with Blackwell's FP4 matmul (`_scaled_mm`) and has
no weight-only form ("emulation on non-Blackwell GPUs" is a TODO there). The NVFP4 rounding here is
torchao's own (`NVFP4Tensor.to_nvfp4`: blocks of 16 values along the input dimension, E4M3 block
scales, a per-tensor fp32 scale from the tensor's current absolute maximum, then `dequantize`);
the layer multiplies the rounded values, which is the FP4 matmul up to the order of accumulation.
Ternary QAT is Axolotl's: weights rounded to {-1, 0, 1} × their row's mean magnitude, activations
to int8 with each token's absolute maximum as scale; at the end the ternary values are written
into the weights. Gradients pass straight through every rounding, as in torchao's QAT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sft.plugins.qat import NVFP4_BLOCK

Rounding = Callable[[torch.Tensor], torch.Tensor]
TERNARY_EPS = 1e-5  # Axolotl's floor for the ternary and int8 scales


def round_to_nvfp4(values: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    rows = values.reshape(-1, values.shape[-1]).contiguous()
    # an all-zero tensor (amax 0) would divide by a zero scale: zeros round to zeros
    amax = rows.abs().max()
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    quantized = NVFP4Tensor.to_nvfp4(
        rows, block_size=NVFP4_BLOCK, per_tensor_scale=per_tensor_amax_to_scale(amax)
    )
    return quantized.dequantize(values.dtype).reshape(values.shape)


def round_to_ternary(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().mean(dim=-1, keepdim=True).clamp_min(TERNARY_EPS)
    return (weight / scale).round().clamp_(-1, 1) * scale


def round_to_int8_per_token(values: torch.Tensor) -> torch.Tensor:
    scale = values.abs().amax(dim=-1, keepdim=True).clamp_min(TERNARY_EPS) / 127
    return (values / scale).round().clamp_(-128, 127) * scale


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, rounding: Rounding) -> torch.Tensor:
        return rounding(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class RoundingQuantizer(torch.nn.Module):
    """`rounding(x)` in the forward pass, the identity in the backward; `enabled = False` passes
    `x` on unchanged."""

    def __init__(self, rounding: Rounding) -> None:
        super().__init__()
        self.rounding = rounding
        self.enabled = True

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return values
        return _StraightThrough.apply(values, self.rounding)


class RoundingLinear(torch.nn.Linear):
    """A linear layer computing with rounded weights (and inputs, with an activation rounding)."""

    def __init__(
        self, source: torch.nn.Linear, weights: Rounding, activations: Rounding | None
    ) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight, self.bias = source.weight, source.bias
        self.weight_fake_quantizer = RoundingQuantizer(weights)
        self.activation_fake_quantizer = RoundingQuantizer(activations) if activations else None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            inputs = self.activation_fake_quantizer(inputs)
        weight = self.weight_fake_quantizer(self.weight)
        return torch.nn.functional.linear(inputs, weight, self.bias)

    def to_linear(self, bake: bool) -> torch.nn.Linear:
        plain = torch.nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        if bake:
            with torch.no_grad():
                self.weight.copy_(self.weight_fake_quantizer.rounding(self.weight))
        plain.weight, plain.bias = self.weight, self.bias
        return plain


def prepare(
    model: torch.nn.Module,
    weights: Rounding,
    activations: Rounding | None,
    is_linear: Callable[[Any, str], bool],
    block: int | None = None,
) -> None:
    """Swap every linear layer `is_linear` selects for a rounding one; with `block`, refuse a
    layer whose input size is not a whole number of blocks, naming it."""
    from sft.errors import ModelError

    chosen = [(n, m) for n, m in model.named_modules() if is_linear(m, n)]
    for name, module in chosen:
        if block and module.in_features % block:
            raise ModelError(
                f"qat: {name} takes {module.in_features} inputs, not a multiple of the "
                f"{block}-value block\n  fix: use an integer or float8 qat type for this model"
            )
    for name, module in chosen:
        _replace(model, name, RoundingLinear(module, weights, activations))


def convert(model: torch.nn.Module, bake: bool) -> int:
    """Swap the rounding layers back to plain linear ones (with `bake`, holding their rounded
    weights); return how many."""
    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, RoundingLinear)]
    for name, module in swapped:
        _replace(model, name, module.to_linear(bake))
    return len(swapped)


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
