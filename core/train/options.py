"""Trainer options taken from the config as they are: NEFTune, torch.compile, activation
offloading, RoPE scaling, LoRA+, a LoRA target regex, the loss watchdog and the schedule keys.

`option_problems` is what `sft validate` finds in them (no torch import); `trainer_arguments`
is what they add to the Trainer's `TrainingArguments`.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

from sft.config.schema import Config
from sft.errors import Problem
from sft.train.schedule import ON_EVAL_LOSS, schedule_problems

# transformers' RoPE types (`ROPE_INIT_FUNCTIONS`, plus the unscaled "default"); a test
# compares this list with the installed transformers.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
COMPILE_MIN_TORCH = (2, 5, 1)  # Axolotl's torch_compile = "auto"


def _torch_version() -> tuple[int, ...]:
    import importlib.metadata

    try:
        text = importlib.metadata.version("torch").split("+")[0]
        return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return (0,)


def compile_enabled(config: Config) -> bool:
    """Whether the model is compiled: `torch_compile` true, "auto" on torch >= 2.5.1, or a
    backend or mode set (which turn it on, as in transformers)."""
    if config.torch_compile == "auto":
        return _torch_version() >= COMPILE_MIN_TORCH
    return bool(config.torch_compile or config.torch_compile_backend or config.torch_compile_mode)


def neftune_alpha(config: Config) -> float | None:
    return config.neftune_noise_alpha or config.noisy_embedding_alpha


def option_problems(config: Config) -> list[Problem]:
    """Problems in the pass-through keys (and the schedule keys)."""
    from sft.hardware import cuda_present

    problems = schedule_problems(config)
    if isinstance(config.lora_target_modules, str):
        try:
            re.compile(config.lora_target_modules)
        except re.error as exc:
            problems.append(
                Problem(
                    "lora_target_modules",
                    f"invalid regex {config.lora_target_modules!r}: {exc}",
                    hint="a string is a regex over full module names; a list names modules",
                )
            )
    if config.adapter and config.loraplus_lr_embedding and not config.loraplus_lr_ratio:
        problems.append(
            Problem(
                "loraplus_lr_embedding",
                "has no effect without loraplus_lr_ratio (it is part of LoRA+)",
                hint="set loraplus_lr_ratio (e.g. 16), or remove loraplus_lr_embedding",
            )
        )
    if config.neftune_noise_alpha and config.noisy_embedding_alpha:
        problems.append(
            Problem(
                "noisy_embedding_alpha",
                "conflicts with neftune_noise_alpha (its newer name): set one",
            )
        )
    if config.offloads_activations:
        switch = (
            "activation_offloading" if config.activation_offloading else "gradient_checkpointing"
        )
        if not config.gradient_checkpointing:
            problems.append(
                Problem(
                    "activation_offloading",
                    "offloads the activations gradient checkpointing keeps, and "
                    "gradient_checkpointing is off",
                    hint="set gradient_checkpointing = true",
                )
            )
        if not cuda_present():
            problems.append(
                Problem(
                    switch,
                    "offloading moves activations from GPU to CPU memory; without a CUDA GPU "
                    "they are in CPU memory already",
                    hint=f"remove {switch}"
                    + (" = 'offload' (use true)" if switch == "gradient_checkpointing" else "")
                    + " on this machine",
                    machine=True,
                )
            )
    problems += _rope_problems(config)
    if config.save_only_model and config.auto_resume_from_checkpoints:
        problems.append(
            Problem(
                "save_only_model",
                "checkpoints without optimizer state cannot resume a run exactly, and "
                "auto_resume_from_checkpoints is on",
                hint="remove save_only_model, or auto_resume_from_checkpoints",
            )
        )
    if config.checkpoint_strategy in ("epoch", "best", "no"):
        for other in ("save_steps", "saves_per_epoch"):
            if getattr(config, other) is not None:
                problems.append(
                    Problem(
                        other,
                        f"conflicts with save_strategy = {config.checkpoint_strategy!r}",
                        hint=f"remove {other}, or set save_strategy = 'steps'",
                    )
                )
    if config.loss_watchdog_patience is not None and config.loss_watchdog_threshold is None:
        problems.append(
            Problem(
                "loss_watchdog_patience",
                "has no effect without loss_watchdog_threshold",
                hint="set loss_watchdog_threshold (e.g. 5.0), or remove loss_watchdog_patience",
            )
        )
    inductor = compile_enabled(config) and config.torch_compile_backend in (None, "inductor")
    compiler = any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    if inductor and not cuda_present() and not compiler:
        problems.append(
            Problem(
                "torch_compile",
                "the inductor backend compiles C++ for the CPU, and no C++ compiler is "
                "installed here",
                hint="install g++, or set torch_compile_backend = 'aot_eager'",
                machine=True,
            )
        )
    return problems


def _rope_problems(config: Config) -> list[Problem]:
    scaling = config.rope_scaling
    if not scaling:
        return []
    if all(isinstance(v, dict) for v in scaling.values()):
        return []  # one table per attention type: checked against the model when it loads
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return [
            Problem(
                "rope_scaling",
                "names no rope_type",
                hint="e.g. rope_scaling = {rope_type = 'linear', factor = 2.0}",
            )
        ]
    if kind not in ROPE_TYPES:
        return [
            Problem(
                "rope_scaling.rope_type",
                f"unknown RoPE type {kind!r}",
                hint=f"one of {', '.join(ROPE_TYPES)}",
            )
        ]
    factor = scaling.get("factor")
    if kind not in ("default", "proportional") and not isinstance(factor, (int, float)):
        return [
            Problem(
                "rope_scaling.factor",
                f"{kind} RoPE scaling needs a factor (the context-length multiple)",
                hint="e.g. factor = 2.0",
            )
        ]
    return []


def trainer_arguments(config: Config) -> dict[str, Any]:
    """The `TrainingArguments` keywords these options set."""
    from transformers.training_args import OptimizerNames

    kwargs: dict[str, Any] = {
        "neftune_noise_alpha": neftune_alpha(config),
        "save_only_model": config.save_only_model,
    }
    if compile_enabled(config):
        kwargs.update(
            torch_compile=True,
            torch_compile_backend=config.torch_compile_backend,
            torch_compile_mode=config.torch_compile_mode,
        )
    # The Trainer treats some optimizers specially by name (LOMO's fused backward): say which
    # one runs. sft builds the optimizer itself either way.
    if config.optimizer in {name.value for name in OptimizerNames}:
        kwargs["optim"] = config.optimizer
    # Schedules stepped on the eval loss: the Trainer needs to know which metric to use.
    if config.lr_scheduler in ON_EVAL_LOSS:
        kwargs["lr_scheduler_type"] = config.lr_scheduler
    return kwargs
