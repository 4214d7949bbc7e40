"""Liger kernels (Triton, CUDA): fused RoPE, RMSNorm, SwiGLU/GeGLU, cross-entropy, and the fused
linear + cross-entropy that never materialises the full logits.

Keys (Axolotl's names): `liger_rope`, `liger_rms_norm`, `liger_glu_activation`,
`liger_layer_norm`, `liger_cross_entropy`, `liger_fused_linear_cross_entropy`. Validated at
`sft validate` time: the package must be installed and a CUDA GPU visible; otherwise the config
is refused with the reason, never a crash at step 1. Applied to the architectures liger
supports; any other architecture is refused by name when the model is loaded.

Only the kernels the keys ask for are applied (`liger_kwargs`): liger's per-architecture
functions turn most kernels on by default and drop keywords they do not take, so every switch
of the architecture's function is passed, on or off; a key asking for a kernel the architecture
has none of (LayerNorm on Llama) is refused by name rather than dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, Kernel
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem
from sft.hardware import cuda_present, installed

SUPPORTED = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "granite",
    "olmo2",
)


@attrs.frozen
class LigerKeys:
    liger_rope: bool = key(False, doc="Liger fused rotary embedding (CUDA).")
    liger_rms_norm: bool = key(False, doc="Liger fused RMSNorm (CUDA).")
    liger_glu_activation: bool = key(False, doc="Liger fused SwiGLU/GeGLU MLP (CUDA).")
    liger_layer_norm: bool = key(False, doc="Liger fused LayerNorm (CUDA).")
    liger_cross_entropy: bool = key(False, doc="Liger cross-entropy (CUDA).")
    liger_fused_linear_cross_entropy: bool = key(
        False, doc="Liger fused LM head + cross-entropy: no full logits tensor (CUDA)."
    )


def _enabled(keys: LigerKeys) -> list[str]:
    return [f.name for f in attrs.fields(LigerKeys) if getattr(keys, f.name)]


# The keyword(s) of liger's apply functions each key switches. GEGLU models (Gemma) call their
# GLU kernel `geglu`, the others `swiglu`.
KEY_KWARGS = {
    "liger_rope": ("rope",),
    "liger_rms_norm": ("rms_norm",),
    "liger_glu_activation": ("swiglu", "geglu"),
    "liger_layer_norm": ("layer_norm",),
    "liger_cross_entropy": ("cross_entropy",),
    "liger_fused_linear_cross_entropy": ("fused_linear_cross_entropy",),
}


def liger_kwargs(
    keys: LigerKeys, parameters: Mapping[str, inspect.Parameter]
) -> tuple[dict[str, bool], list[str]]:
    """The keywords for one architecture's liger function (its `parameters`), and the enabled
    keys it has no kernel for.

    Every on/off switch of the function is passed: on where a key asks for it, off otherwise,
    so liger's defaults (most kernels on) never apply a kernel nobody asked for.
    """
    kwargs = {
        name: False for name, parameter in parameters.items() if isinstance(parameter.default, bool)
    }
    unmatched = []
    for key_name, names in KEY_KWARGS.items():
        if not getattr(keys, key_name):
            continue
        present = [name for name in names if name in kwargs]
        if not present:
            unmatched.append(key_name)
        for name in present:
            kwargs[name] = True
    return kwargs, unmatched


def available() -> tuple[bool, str]:
    if not installed("liger_kernel"):
        return False, "liger-kernel is not installed (pip install 'sft-train[liger]')"
    if not cuda_present():
        return (
            False,
            "liger kernels are Triton kernels for CUDA GPUs; no NVIDIA GPU is visible here",
        )
    return True, "ok"


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    # Axolotl's LigerPlugin only makes the liger_* keys known; here they are always known.
    return [ConfigKeys(LigerKeys, axolotl_integrations=("axolotl.integrations.liger.LigerPlugin",))]


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    keys = config.section(LigerKeys)
    enabled = _enabled(keys)
    if not enabled:
        return []
    problems = []
    if keys.liger_cross_entropy and keys.liger_fused_linear_cross_entropy:
        problems.append(
            Problem(
                "liger_cross_entropy", "conflicts with liger_fused_linear_cross_entropy: choose one"
            )
        )
    return problems


# The model parts each key's kernel replaces (sft.components.MODEL_PARTS).
KEY_PARTS = {
    "liger_rope": ("rope",),
    "liger_rms_norm": ("rms_norm",),
    "liger_glu_activation": ("swiglu", "geglu"),
    "liger_layer_norm": ("layer_norm",),
    "liger_cross_entropy": ("cross_entropy",),
    "liger_fused_linear_cross_entropy": ("cross_entropy", "lm_head"),
}


def replaced_parts(config: Config) -> list[str]:
    return [part for key in _enabled(config.section(LigerKeys)) for part in KEY_PARTS[key]]


@hookimpl
def sft_register_kernels(register: Callable[[Kernel], None]) -> None:
    register(
        Kernel(
            "liger",
            available,
            "Liger Triton kernels (RoPE, RMSNorm, GLU, CE, fused linear CE)",
            enabled_by=lambda config: _enabled(config.section(LigerKeys)),
            replaces=replaced_parts,
        )
    )


@hookimpl
def sft_patch_model(model: Any, config: Config) -> None:
    keys = config.section(LigerKeys)
    if not _enabled(keys):
        return
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise ModelError(
            f"liger kernels do not support the {model_type!r} architecture (supported: {', '.join(SUPPORTED)})\n"
            "  fix: remove the liger_* keys for this model"
        )
    import torch

    if not torch.cuda.is_available():
        raise ModelError("liger kernels need a CUDA GPU\n  fix: remove the liger_* keys on CPU")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ModelError(
            f"the installed liger-kernel has no kernels for the {model_type!r} architecture\n"
            "  fix: upgrade liger-kernel, or remove the liger_* keys for this model"
        )
    kwargs, unmatched = liger_kwargs(keys, inspect.signature(apply).parameters)
    if unmatched:
        raise ModelError(
            f"{', '.join(unmatched)} would have no effect: liger has no such kernel for "
            f"{model_type!r} models\n  fix: remove {', '.join(unmatched)} for this model"
        )
    apply(model=model, **kwargs)
