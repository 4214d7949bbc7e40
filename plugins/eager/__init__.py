"""The reference attention of transformers (`attn_implementation = "eager"`)."""

from __future__ import annotations

from collections.abc import Callable

from sft import hookimpl
from sft.components import AttentionBackend


@hookimpl
def sft_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    register(
        AttentionBackend(
            name="eager",
            hf_implementation="eager",
            packing="mask",
            description="plain matmul-softmax attention; slowest, the numerical reference",
        )
    )
