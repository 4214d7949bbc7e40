"""FSDP (prefer FSDP2) through the HF Trainer and accelerate, selected by Axolotl's keys.

`fsdp_version` + `fsdp_config` (or Axolotl's older `fsdp = ["full_shard", "auto_wrap"]`) turn it
on; `sft.plugins.fsdp.settings` reads every spelling into one `FsdpSettings`. The run passes
`fsdp=True` + `fsdp_config` (transformers' own key names) to `TrainingArguments`; the decoder
layer class to wrap comes from the model (`_no_split_modules`) when the config names none.

Saving: checkpoints use `state_dict_type` (SHARDED_STATE_DICT writes one file per process,
`sft merge-sharded` turns one into a model); the final save always gathers a full state dict,
so the output is an ordinary safetensors model or adapter that transformers / peft load.

accelerate drives FSDP on GPUs (CUDA and other accelerators) only: on a CPU-only machine the
Trainer would silently fall back to plain data parallelism, so such a config is refused there
(a machine problem; `sft validate --portable` skips it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, DistributedBackend
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem
from sft.plugins.fsdp import native
from sft.plugins.fsdp.settings import FsdpSettings, is_on, resolve


@attrs.frozen
class FsdpKeys:
    # `Any`: true/false, a list of options or a space-separated string (checked in `resolve`).
    fsdp: Any = key(
        None,
        doc="Axolotl's older FSDP switch: true, or options like ['full_shard', 'auto_wrap'] "
        "('offload' = offload_params; 'shard_grad_op' keeps parameters gathered between forward "
        "and backward); false turns FSDP off whatever else is set.",
    )
    fsdp_version: Literal[1, 2] | None = key(
        None,
        doc="FSDP version: 2 (the default once FSDP is on; per-parameter sharding) or 1 "
        "(legacy, deprecated in transformers). Setting it turns FSDP on.",
    )
    fsdp_config: dict[str, Any] | None = key(
        None,
        doc="FSDP settings (Axolotl's names, `fsdp_` prefix optional): reshard_after_forward, "
        "state_dict_type (FULL_STATE_DICT / SHARDED_STATE_DICT, for checkpoints), "
        "auto_wrap_policy (TRANSFORMER_BASED_WRAP / SIZE_BASED_WRAP / NO_WRAP), "
        "transformer_layer_cls_to_wrap (default: the model's decoder layer), min_num_params, "
        "offload_params, cpu_ram_efficient_loading, activation_checkpointing. Setting it turns "
        "FSDP on.",
    )


def _keys(config: Config) -> FsdpKeys:
    return config.section(FsdpKeys)


def fsdp_keys_on(config: Config) -> bool:
    keys = _keys(config)
    return is_on(keys.fsdp, keys.fsdp_version, keys.fsdp_config)


def native_selected(config: Config) -> bool:
    """expert_parallel_size: transformers' native sharded loading (`native`)."""
    return native.requested(config.section(native.ParallelKeys))


def selected(config: Config) -> bool:
    """accelerate's FSDP: the fsdp keys or the FSDP2 shard/replicate sizes, without expert
    parallelism (which selects `native`, taking the fsdp keys with it)."""
    parallel = config.section(native.ParallelKeys)
    wanted = fsdp_keys_on(config) or native.data_parallel_requested(parallel)
    return wanted and not native_selected(config)


def settings_of(config: Config) -> FsdpSettings:
    """The run's FSDP settings (the config was validated: no problem is left); FSDP2's
    defaults when only the shard/replicate sizes turned it on."""
    keys = _keys(config)
    return resolve(keys.fsdp, keys.fsdp_version, keys.fsdp_config)[0]


def _native_settings(config: Config) -> FsdpSettings | None:
    return settings_of(config) if fsdp_keys_on(config) else None


def native_model_kwargs(config: Config) -> dict[str, Any]:
    keys = config.section(native.ParallelKeys)
    return {"distributed_config": native.distributed_config(keys, _native_settings(config))}


def native_training_args(config: Config, model: Any) -> dict[str, Any]:
    """The Trainer trains the model transformers sharded as it loaded; its checkpoints can hold
    the model only (see `native`)."""
    if problem := native.layer_problem(_native_settings(config), model):
        raise ModelError(problem)
    if not native.experts_sharded(model):
        raise ModelError(
            f"expert_parallel_size: transformers sharded no expert weights of "
            f"{config.base_model} (a dense model, or a MoE class without an expert plan)\n  fix: "
            "remove expert_parallel_size (dp_shard_size shards a dense model)"
        )
    return {"save_only_model": True}


def engine_runs_here() -> tuple[bool, str]:
    """Whether accelerate can shard with FSDP on this machine (it does so on GPUs only)."""
    from sft.hardware import cuda_present

    if cuda_present():
        return True, ""
    return False, (
        "accelerate runs FSDP on GPUs only; on a CPU-only machine the Trainer would silently "
        "use plain data parallelism (every process holding the whole model) instead"
    )


def _where(config: Config) -> str:
    keys = _keys(config)
    parallel = config.section(native.ParallelKeys)
    if not fsdp_keys_on(config) and native.data_parallel_requested(parallel):
        return "dp_shard_size" if (parallel.dp_shard_size or 1) > 1 else "dp_replicate_size"
    if keys.fsdp_config is not None:
        return "fsdp_config"
    return "fsdp_version" if keys.fsdp_version is not None else "fsdp"


def check(config: Config) -> list[Problem]:
    """What FSDP cannot do with the rest of this config, or on this machine (the keys
    themselves are checked by `sft_validate_config`)."""
    problems = []
    settings = settings_of(config)
    ok, reason = engine_runs_here()
    if not ok:
        problems.append(
            Problem(
                _where(config),
                f"FSDP is unavailable on this machine: {reason}",
                hint="run on CUDA GPUs, or remove the fsdp keys here (several processes on a "
                "CPU then train with plain data parallelism)",
                machine=True,
            )
        )
    if config.load_in_8bit:
        problems.append(
            Problem(
                "load_in_8bit",
                "FSDP cannot shard bitsandbytes 8-bit weights",
                hint="use load_in_4bit with adapter = 'qlora', or no quantization",
            )
        )
    if settings.activation_checkpointing and config.adapter:
        # peft finds the adapter's weights by module name, and FSDP's checkpoint wrapper renames
        # the layers (`_checkpoint_wrapped_module`): the final save would write an empty
        # adapter_model.safetensors (seen with peft 0.21, accelerate 1.15). transformers'
        # layer-wise checkpointing saves the same activation memory without renaming anything.
        problems.append(
            Problem(
                "fsdp_config.activation_checkpointing",
                "with an adapter it runs as gradient_checkpointing (transformers' per-layer "
                "recomputation, the same memory saving): FSDP's own wrapper would rename the "
                "layers and hide the adapter's weights from peft's save",
                hint="set gradient_checkpointing = true instead to silence this",
                warning=True,
            )
        )
    elif settings.activation_checkpointing and config.gradient_checkpointing:
        problems.append(
            Problem(
                "gradient_checkpointing",
                "recomputes activations a second time on top of "
                "fsdp_config.activation_checkpointing",
                hint="keep fsdp_config.activation_checkpointing (FSDP's own, no extra all-gather) "
                "and remove gradient_checkpointing",
            )
        )
    return problems


def _no_split_modules(model: Any) -> tuple[str, ...]:
    """The model's decoder layer class names (transformers' `_no_split_modules`)."""
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        names = getattr(candidate, "_no_split_modules", None) if candidate is not None else None
        if names:
            return tuple(dict.fromkeys(names))
    return ()


def _class_names(model: Any) -> set[str]:
    return {type(module).__name__ for module in model.modules()}


def training_args(config: Config, model: Any) -> dict[str, Any]:
    """`fsdp` / `fsdp_config` for `TrainingArguments`, the wrap class found on the model."""
    if "LOCAL_RANK" not in os.environ:
        raise ModelError(
            "FSDP shards the model across processes, and this run was started as one plain "
            "process\n  fix: sft run --nproc-per-node N CONFIG, or torchrun --nproc-per-node N "
            "-m sft run CONFIG (N = number of GPUs)"
        )
    settings = settings_of(config)
    layers: tuple[str, ...] | None = None
    if settings.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
        present = _class_names(model)
        if settings.transformer_layer_cls_to_wrap:
            missing = [n for n in settings.transformer_layer_cls_to_wrap if n not in present]
            if missing:
                layers_here = [n for n in sorted(present) if "Layer" in n or "Block" in n]
                raise ModelError(
                    f"fsdp_config.transformer_layer_cls_to_wrap: {', '.join(missing)} is not a "
                    f"module class of {config.base_model}\n  fix: use one of "
                    f"{', '.join(layers_here) or ', '.join(sorted(present))}, or leave the key "
                    "out (the model's decoder layer is found by itself)"
                )
        else:
            layers = tuple(n for n in _no_split_modules(model) if n in present)
            if not layers:
                raise ModelError(
                    f"cannot tell the decoder layer class of {config.base_model} to wrap for "
                    "FSDP (the model lists no _no_split_modules)\n  fix: set "
                    "fsdp_config.transformer_layer_cls_to_wrap, e.g. 'LlamaDecoderLayer'"
                )
    fsdp_config = settings.fsdp_config(layers)
    if _checkpoints_layers_itself(config):
        fsdp_config["activation_checkpointing"] = False  # done by sft_patch_model instead
    args: dict[str, Any] = {"fsdp": True, "fsdp_config": fsdp_config}
    parallel = config.section(native.ParallelKeys)
    if native.data_parallel_requested(parallel):
        args["parallelism_config"] = native.parallelism_config(
            parallel, int(os.environ.get("WORLD_SIZE", "1"))
        )
    return args


def _checkpoints_layers_itself(config: Config) -> bool:
    """FSDP's activation checkpointing asked for beside an adapter, or with the native engine:
    transformers' layer-wise gradient checkpointing stands in (see `check`)."""
    if config.gradient_checkpointing or not fsdp_keys_on(config):
        return False
    if not settings_of(config).activation_checkpointing:
        return False
    return native_selected(config) or bool(config.adapter)


@hookimpl
def sft_patch_model(model: Any, config: Config) -> None:
    if _checkpoints_layers_itself(config):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def available() -> tuple[bool, str]:
    # torch.distributed ships with every torch build sft supports.
    return True, ""


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [
        ConfigKeys(FsdpKeys),
        ConfigKeys(native.ParallelKeys, axolotl_integrations=(native.EP_INTEGRATION,)),
    ]


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    keys = _keys(config)
    settings, found = resolve(keys.fsdp, keys.fsdp_version, keys.fsdp_config)
    parallel = config.section(native.ParallelKeys)
    if found:
        return found
    if native.data_parallel_requested(parallel) and fsdp_keys_on(config) and settings.version != 2:
        found.append(
            Problem(
                "fsdp_version",
                "dp_shard_size / dp_replicate_size shard with FSDP2 (accelerate's "
                "ParallelismConfig); FSDP1 cannot",
                hint="set fsdp_version = 2",
            )
        )
    return found + native.problems(parallel, settings if fsdp_keys_on(config) else None, config)


@hookimpl
def sft_register_distributed_backends(register: Callable[[DistributedBackend], None]) -> None:
    register(
        DistributedBackend(
            name="fsdp",
            selected=selected,
            training_args=training_args,
            check=check,
            available=available,
            description="PyTorch FSDP2 (or FSDP1) via accelerate: parameters, gradients and "
            "optimizer state sharded across processes",
        )
    )
    register(
        DistributedBackend(
            name="fsdp2_native",
            selected=native_selected,
            training_args=native_training_args,
            model_kwargs=native_model_kwargs,
            available=available,
            description="transformers' native sharded loading (DistributedConfig), selected by "
            "dp_shard_size / dp_replicate_size / expert_parallel_size: FSDP2, HSDP and expert "
            "parallelism, on GPUs and CPUs",
        )
    )


@hookimpl
def sft_before_save(config: Config, model: Any, output_dir: str, trainer: Any) -> None:
    """The final save gathers a full state dict, whatever the checkpoints used: with
    SHARDED_STATE_DICT the Trainer's `save_model` would otherwise write no weights at all."""
    if trainer is None or not selected(config):
        return
    plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(plugin, "fsdp_plugin", None)
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        return
    # `set_state_dict_type` keeps existing (sharded) state-dict configs: clear them first.
    plugin.state_dict_config = None
    plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
