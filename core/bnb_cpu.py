"""A correct CPU dequantization for bitsandbytes 4-bit weights whose rows split a block.

bitsandbytes quantizes a 4-bit weight in blocks of `blocksize` consecutive values of the
flattened tensor, but its native AVX-512 CPU kernel (bitsandbytes 0.46 to at least 0.50)
dequantizes block by block *within each row*. When the last dimension is not a multiple of the
block size, a block spans two rows and every row after the first is dequantized with the wrong
scales: silently wrong base weights (a relative error of 0.3-0.5 instead of ~0.1) for QLoRA and
quantized MoE experts. Real models' dimensions are multiples of 64 (the default block size), so
the native kernel is kept unless a loaded model holds such a weight; then the operator's CPU
kernel is replaced, for the rest of the process, by bitsandbytes' own pure-PyTorch one (about
5x slower to dequantize, and correct).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

_installed = False


def splits_blocks(shape: Sequence[int], blocksize: int) -> bool:
    """Whether a block of the flattened weight spans two rows of `shape`."""
    return len(shape) > 1 and math.prod(shape[:-1]) > 1 and shape[-1] % blocksize != 0


def native_kernel_is_row_blocked() -> bool:
    """bitsandbytes uses its row-blocked native kernel on CPUs with AVX-512 (torch >= 2.6)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _quant_states(model: Any) -> list[Any]:
    states = []
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if (state := getattr(parameter, "quant_state", None)) is not None:
                states.append(state)
        for parametrization in getattr(module, "parametrizations", {}).values():
            for item in parametrization:
                if (state := getattr(item, "quant_state", None)) is not None:
                    states.append(state)
    return states


def fix_cpu_dequantize_if_needed(model: Any) -> bool:
    """Install the correct kernel when `model` holds a 4-bit weight the native one gets wrong;
    return whether it is installed (it stays for the process)."""
    global _installed
    if _installed:
        return True
    if not any(splits_blocks(s.shape, s.blocksize) for s in _quant_states(model)):
        return False
    if not native_kernel_is_row_blocked():
        return False
    _install()
    _installed = True
    return True


def _install() -> None:
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(
        A: torch.Tensor,
        absmax: torch.Tensor,
        blocksize: int,
        quant_type: str,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
