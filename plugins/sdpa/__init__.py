"""PyTorch scaled-dot-product attention (`attn_implementation = "sdpa"`, the default)."""

from __future__ import annotations

from collections.abc import Callable

from sft import hookimpl
from sft.components import AttentionBackend


@hookimpl
def sft_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    register(
        AttentionBackend(
            name="sdpa",
            hf_implementation="sdpa",
            packing="mask",
            description="torch scaled_dot_product_attention; packed samples via a block-diagonal mask",
        )
    )
