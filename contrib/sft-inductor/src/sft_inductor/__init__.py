"""Compiled CPU kernels: RMSNorm and rotary embeddings fused by TorchInductor.

In eager PyTorch, an RMSNorm is five elementwise passes over the activations (square, mean,
rsqrt, two multiplies) and rotary embeddings are six (two halves rotated, four multiplies and
adds), each reading and writing the whole tensor, forward and backward. TorchInductor fuses
each into one C++ loop over the data (vectorised for this CPU): on SmolLM2's shapes the
RMSNorm's forward + backward is about 2-3x faster and the rotary embedding about 1.5x. How much
that saves of a whole training step is measured by bench/bench_inductor.py.

The first step pays the compilation (seconds, with a C++ compiler); the results equal the
eager ones to float rounding.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import attrs

from sft import plugin


@attrs.frozen
class InductorKeys:
    inductor_rms_norm: bool = plugin.key(
        False,
        doc="Inductor: compile every *RMSNorm module of the model (fused forward and backward).",
    )
    inductor_rope: bool = plugin.key(
        False,
        doc="Inductor: compile the model family's apply_rotary_pos_emb (fused rotary embedding).",
    )


def enabled_keys(config: plugin.Config) -> list[str]:
    keys = config.section(InductorKeys)
    return [name for name in ("inductor_rms_norm", "inductor_rope") if getattr(keys, name)]


def replaced_parts(config: plugin.Config) -> list[str]:
    """The model parts the enabled keys compile (`sft.plugin.MODEL_PARTS`)."""
    parts = {"inductor_rms_norm": "rms_norm", "inductor_rope": "rope"}
    return [parts[name] for name in enabled_keys(config)]


def available() -> tuple[bool, str]:
    """TorchInductor's CPU backend writes C++ and builds it with the system's compiler (`CXX`,
    else g++). Checked without importing torch: `sft plugins list` must stay light."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        return False, f"TorchInductor needs a C++ compiler ({compiler}) on PATH (apt install g++)"
    return True, ""


def rms_norms(model: Any) -> list[Any]:
    return [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]


def rotary_module(model: Any) -> Any:
    """The transformers modeling module whose attention calls `apply_rotary_pos_emb`."""
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        if modeling is not None and callable(getattr(modeling, "apply_rotary_pos_emb", None)):
            return modeling
    return None


def compile_rms_norms(model: Any) -> int:
    norms = rms_norms(model)
    for norm in norms:
        norm.compile()  # in place: `forward` runs through the compiled graph
    return len(norms)


def compile_rope(modeling: Any) -> None:
    import torch

    function = modeling.apply_rotary_pos_emb
    if not getattr(function, "_sft_inductor", False):
        compiled = torch.compile(function)
        compiled._sft_inductor = True  # type: ignore[attr-defined]
        modeling.apply_rotary_pos_emb = compiled


@plugin.hookimpl
def sft_config_keys() -> list[plugin.ConfigKeys]:
    return [plugin.ConfigKeys(InductorKeys)]


@plugin.hookimpl
def sft_register_kernels(register: Callable[[plugin.Kernel], None]) -> None:
    register(
        plugin.Kernel(
            "inductor",
            available,
            "TorchInductor-compiled RMSNorm and rotary embeddings (CPU or GPU)",
            enabled_by=enabled_keys,
            replaces=replaced_parts,
        )
    )


@plugin.hookimpl
def sft_patch_model(model: Any, config: plugin.Config) -> None:
    keys = config.section(InductorKeys)
    if keys.inductor_rms_norm and not compile_rms_norms(model):
        raise plugin.ConfigError(
            [
                plugin.Problem(
                    "inductor_rms_norm",
                    f"this model ({type(model).__name__}) has no *RMSNorm module to compile",
                    hint="remove inductor_rms_norm",
                )
            ],
            config.source,
        )
    if keys.inductor_rope:
        modeling = rotary_module(model)
        if modeling is None:
            raise plugin.ConfigError(
                [
                    plugin.Problem(
                        "inductor_rope",
                        f"this model ({type(model).__name__}) has no apply_rotary_pos_emb to "
                        "compile",
                        hint="remove inductor_rope",
                    )
                ],
                config.source,
            )
        compile_rope(modeling)
