"""`attn_implementation = "flex_attention"` (Axolotl: `flex_attention: true`).

transformers builds a block mask from the restarting `position_ids` of packed rows. In this
torch, flex attention's backward runs on CUDA only: training with it needs a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sft import hookimpl
from sft.components import AttentionBackend
from sft.config.schema import Config
from sft.errors import Problem
from sft.hardware import cuda_present


def _check(config: Config) -> Sequence[Problem]:
    if not cuda_present():
        return [
            Problem(
                "attn_implementation" if config.attn_implementation else "flex_attention",
                "flex_attention trains on CUDA GPUs only (its backward pass has no CPU kernel); "
                "no NVIDIA GPU is visible here",
                hint="use attn_implementation = 'sdpa' on CPU (it keeps packed samples apart too)",
                machine=True,
            )
        ]
    return []


@hookimpl
def sft_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    register(
        AttentionBackend(
            name="flex_attention",
            hf_implementation="flex_attention",
            packing="block_mask",
            check=_check,
            description="torch flex attention; packed samples via a block mask (CUDA for training)",
        )
    )
