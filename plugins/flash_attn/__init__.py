"""`attn_implementation = "flash_attention_2"` / `"flash_attention_3"` (Axolotl: `flash_attention: true`).

Packed rows reach flash-attn as varlen sequences (`cu_seqlens` from the restarting
`position_ids`, no padding computed). Needs the `flash-attn` package (or `flash_attn_3`), a
CUDA GPU, and bf16 or fp16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sft import hookimpl
from sft.components import AttentionBackend
from sft.config.schema import Config
from sft.errors import Problem
from sft.hardware import cuda_present, installed

INSTALL = {
    "flash_attention_2": ("flash_attn", "pip install 'sft-train[flash-attn]' --no-build-isolation"),
    "flash_attention_3": (
        "flash_attn_interface",
        "install FlashAttention-3 from its hopper/ directory (H100/H200)",
    ),
}


def _availability(name: str) -> Callable[[], tuple[bool, str]]:
    module, install = INSTALL[name]

    def available() -> tuple[bool, str]:
        if not installed(module):
            return False, f"the {module} package is not installed ({install})"
        if not cuda_present():
            return False, "runs on CUDA GPUs only; no NVIDIA GPU is visible here"
        return True, ""

    return available


def _checker(name: str) -> Callable[[Config], Sequence[Problem]]:
    module, install = INSTALL[name]

    def check(config: Config) -> Sequence[Problem]:
        key = "attn_implementation" if config.attn_implementation else "flash_attention"
        problems = []
        if not installed(module):
            problems.append(
                Problem(
                    key,
                    f"{name} needs the {module} package, which is not installed",
                    hint=install,
                    machine=True,
                )
            )
        if not cuda_present():
            problems.append(
                Problem(
                    key,
                    f"{name} runs on CUDA GPUs only; no NVIDIA GPU is visible here",
                    hint="use attn_implementation = 'sdpa' on CPU",
                    machine=True,
                )
            )
        if config.bf16 is False and not (config.fp16 or config.float16):
            problems.append(
                Problem(
                    key,
                    f"{name} computes in bf16 or fp16 only",
                    hint="set bf16 = 'auto' (or true), or fp16 = true",
                )
            )
        return problems

    return check


@hookimpl
def sft_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    for name in INSTALL:
        register(
            AttentionBackend(
                name=name,
                hf_implementation=name,
                packing="varlen",
                dtypes=("float16", "bfloat16"),
                check=_checker(name),
                available=_availability(name),
                description=f"{name.replace('_', ' ')}: varlen kernels, packed rows without padding (CUDA)",
            )
        )
