"""Core checks that span several keys or need the plugin registries (no model load, no torch)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sft.config.schema import ATTENTION_ALIASES, ATTENTION_VALUE_ALIASES, Config
from sft.errors import PluginError, Problem

if TYPE_CHECKING:
    from sft.manager import SftPlugins

AddProblem = Callable[..., None]

UNSUPPORTED_ATTENTION = {
    "fsa": "is Axolotl's flash sparse attention (DeepSeek-V3's native sparse attention "
    "kernels), which sft does not support; use sdpa, or flash_attention_2 on a GPU",
}


def resolve_batch_size(values: dict[str, Any], add: AddProblem) -> None:
    """Axolotl's `batch_size` sets gradient_accumulation_steps (= batch_size / micro_batch_size)."""
    batch = values.get("batch_size")
    if batch is None:
        return
    if "gradient_accumulation_steps" in values:
        add(
            ("batch_size",),
            "conflicts with gradient_accumulation_steps: batch_size only sets it",
            hint="set one of batch_size and gradient_accumulation_steps",
        )
        return
    micro = values.get("micro_batch_size", 1)
    if batch % micro:
        add(
            ("batch_size",),
            f"{batch} is not a multiple of micro_batch_size = {micro}",
            hint=f"use a multiple of {micro}, or set gradient_accumulation_steps",
        )
        return
    values["gradient_accumulation_steps"] = batch // micro


def _family(backend: str) -> str:
    """flash_attention_2 and _3 are one choice for Axolotl's `flash_attention: true`."""
    return "flash" if backend.startswith("flash_attention_") else backend


def check_selections(values: dict[str, Any], plugins: SftPlugins, add: AddProblem) -> None:
    """Components selected by name must be registered: optimizer, attention backend; Axolotl's
    batch_size resolved."""
    resolve_batch_size(values, add)
    optimizer = values.get("optimizer", "adamw_torch")
    optimizers = plugins.optimizers()
    if optimizer not in optimizers:
        add(("optimizer",), optimizers.unknown_message(optimizer))
    objective = values.get("objective")
    if objective is not None and objective not in plugins.objectives():
        add(("objective",), plugins.objectives().unknown_message(objective))

    aliases = [alias for alias in ATTENTION_ALIASES if values.get(alias)]
    backends_asked = {_family(ATTENTION_ALIASES[alias]) for alias in aliases}
    if len(backends_asked) > 1:
        add((aliases[1],), f"conflicts with {aliases[0]}: choose one attention backend")
    attention = values.get("attn_implementation")
    # Axolotl configs often say both; only different backends conflict.
    chosen = _family(ATTENTION_VALUE_ALIASES.get(attention, attention)) if attention else None
    if attention and aliases and backends_asked != {chosen}:
        add((aliases[0],), f"conflicts with attn_implementation = {attention!r}; keep one")
    if attention in UNSUPPORTED_ATTENTION:
        add(("attn_implementation",), UNSUPPORTED_ATTENTION[attention])
        return
    attention = ATTENTION_VALUE_ALIASES.get(attention, attention)
    name = attention or (ATTENTION_ALIASES[aliases[0]] if aliases else "sdpa")
    backends = plugins.attention_backends()
    if name not in backends:
        where = ("attn_implementation",) if attention or not aliases else (aliases[0],)
        add(where, backends.unknown_message(name))


def _both(config: Config, first: str, second: str) -> Problem | None:
    if getattr(config, first) is not None and getattr(config, second) is not None:
        return Problem(second, f"conflicts with {first}: set only one of them")
    return None


SPECIAL_TOKEN_ROLES = (
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


def _hardware_and_model_problems(config: Config) -> list[Problem]:
    """What `sft run` would refuse later, found now (no torch import: see sft.hardware)."""
    import re
    from pathlib import Path

    from sft.hardware import bitsandbytes_runs_on_cpu, cuda_present, package_version

    problems = []
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(config, flag) and not cuda_present() and not bitsandbytes_runs_on_cpu():
            problems.append(
                Problem(
                    flag,
                    "no CUDA GPU is visible here, and the installed bitsandbytes "
                    f"({package_version('bitsandbytes') or 'not installed'}) quantizes on CUDA only",
                    machine=True,
                    hint="pip install 'bitsandbytes>=0.48' (it quantizes on CPU too), or remove "
                    f"{flag} (and use adapter = 'lora')",
                )
            )
    for role in sorted(set(config.special_tokens or {}) - set(SPECIAL_TOKEN_ROLES)):
        problems.append(
            Problem(
                f"special_tokens.{role}",
                f"unknown special token role {role!r}",
                hint=f"one of {', '.join(SPECIAL_TOKEN_ROLES)}",
            )
        )
    for index, pattern in enumerate(config.unfrozen_parameters or ()):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(
                Problem(f"unfrozen_parameters[{index}]", f"invalid regex {pattern!r}: {exc}")
            )
    if config.unfrozen_parameters and config.adapter:
        problems.append(
            Problem(
                "unfrozen_parameters",
                "applies to a full fine-tune; with an adapter use lora_modules_to_save",
            )
        )
    if config.lora_model_dir:
        local = Path(config.lora_model_dir).expanduser()
        if local.is_dir() and not (local / "adapter_config.json").exists():
            problems.append(
                Problem(
                    "lora_model_dir", f"{local} holds no adapter_config.json (not a saved adapter)"
                )
            )
        elif not local.exists() and config.lora_model_dir.startswith((".", "/", "~")):
            problems.append(
                Problem("lora_model_dir", f"directory not found: {config.lora_model_dir}")
            )
        if not config.adapter:
            problems.append(Problem("lora_model_dir", "continues an adapter: set adapter = 'lora'"))
    return problems


def _dataset_path_problems(config: Config) -> list[Problem]:
    """A local dataset file that does not exist, found before any model or data is loaded.

    Relative paths are read from the working directory, as the data pipeline reads them. URLs
    are not checked (no network here), nor Hub-id-shaped names (`org/name`) absent locally.
    """
    from pathlib import Path

    from sft.data.sources import is_local_path

    problems = []
    for where, ds in config.all_datasets():
        path = ds.path
        local = Path(path).expanduser()
        if "://" in path or local.exists() or not is_local_path(path):
            continue
        hint = "check the path"
        if not local.is_absolute():
            hint += f"; a relative path is read from the working directory ({Path.cwd()})"
        problems.append(
            Problem(f"{where}.path", f"file not found: {path}", hint=hint, machine=True)
        )
    return problems


def _output_dir_problems(config: Config) -> list[Problem]:
    """An output_dir that is a file, or that would write over the base model's own files."""
    from pathlib import Path

    output = Path(config.output_dir).resolve()
    problems = []
    if output.exists() and not output.is_dir():
        problems.append(
            Problem(
                "output_dir",
                f"{config.output_dir} is a file",
                machine=True,
                hint="set output_dir to a directory path",
            )
        )
    base = Path(config.base_model)
    if not base.is_dir():
        return problems
    base = base.resolve()
    if output == base:
        problems.append(
            Problem(
                "output_dir",
                "is the base_model directory: saving would overwrite the base model's files",
                hint="choose a separate output_dir",
            )
        )
    elif not config.adapter and base in output.parents:
        problems.append(
            Problem(
                "output_dir",
                "is inside the base_model directory: a full fine-tune would mix its checkpoints "
                "and weights into the base model's folder",
                hint="choose an output_dir outside the base model's directory",
            )
        )
    return problems


def _shard_problems(config: Config) -> list[Problem]:
    problems = []
    for where, ds in config.all_datasets():
        if (ds.shards is None) != (ds.shards_idx is None):
            missing = "shards_idx" if ds.shards_idx is None else "shards"
            problems.append(
                Problem(
                    f"{where}.{missing}",
                    "shards and shards_idx go together: how many pieces, and which one",
                    hint=f"set {missing} too, or remove the other",
                )
            )
        elif ds.shards is not None and ds.shards_idx is not None and ds.shards_idx >= ds.shards:
            problems.append(
                Problem(
                    f"{where}.shards_idx",
                    f"is {ds.shards_idx}, but there are only {ds.shards} shards (0 to "
                    f"{ds.shards - 1})",
                )
            )
    return problems


def _axolotl_value_problems(config: Config, plugins: SftPlugins) -> list[Problem]:
    """Axolotl values sft maps onto its own: notes that say so; entries of `plugins` that no
    installed sft plugin stands in for: errors."""
    problems = []
    if config.attn_implementation in ATTENTION_VALUE_ALIASES:
        problems.append(
            Problem(
                "attn_implementation",
                f"{config.attn_implementation!r} (an Axolotl backend) runs as sft's "
                f"{config.attention!r}: the same exact attention",
                hint=f"set attn_implementation = {config.attention!r} to silence this",
                warning=True,
            )
        )
    if config.xformers_attention:
        problems.append(
            Problem(
                "xformers_attention",
                "Axolotl's xformers attention runs as sft's 'sdpa': the same exact attention",
                hint="set attn_implementation = 'sdpa' (or nothing: it is the default) instead",
                warning=True,
            )
        )
    if config.model_type and config.model_type.endswith("ForConditionalGeneration"):
        problems.append(
            Problem(
                "model_type",
                f"{config.model_type!r} is not a causal-LM class: a multimodal one trains here "
                "on text only (the datasets carry no images), its vision/audio towers loaded "
                "and left unchanged (an encoder-decoder model is refused when it loads)",
                hint="use AutoModelForCausalLM (or the text model's …ForCausalLM) to load the "
                "language model alone, or remove model_type to silence this",
                warning=True,
            )
        )
    elif config.model_type and not config.model_type.endswith("ForCausalLM"):
        problems.append(
            Problem(
                "model_type",
                f"{config.model_type!r} is not a causal-LM class: sft fine-tunes causal "
                "language models (multimodal, sequence-classification and other heads are "
                "not supported)",
                hint="use AutoModelForCausalLM or the model's own …ForCausalLM class",
            )
        )
    if config.tokenizer_use_mistral_common:
        problems += [
            Problem(
                name,
                "a mistral-common tokenizer has a fixed vocabulary: tokens cannot be added "
                "or redefined",
                hint=f"remove {name}, or tokenizer_use_mistral_common",
            )
            for name in ("special_tokens", "tokens", "tokenizer_type")
            if getattr(config, name)
        ]
        if config.base_model.endswith(".gguf") and not config.tokenizer_config:
            problems.append(
                Problem(
                    "tokenizer_use_mistral_common",
                    "a GGUF file has no mistral-common tokenizer file (tekken.json)",
                    hint="set tokenizer_config to the model's Hub id or directory",
                )
            )
    if config.cls_model_config and not config.cls_model_config.endswith("Config"):
        problems.append(
            Problem(
                "cls_model_config",
                f"{config.cls_model_config!r} is not a transformers config class",
                hint="name a …Config class, e.g. LlamaConfig, or remove cls_model_config",
            )
        )
    if config.tokenizer_type and not config.tokenizer_type.endswith(("Tokenizer", "TokenizerFast")):
        problems.append(
            Problem(
                "tokenizer_type",
                f"{config.tokenizer_type!r} is not a tokenizer class (processors and feature "
                "extractors belong to multimodal models, which sft does not train)",
                hint="use AutoTokenizer or a …Tokenizer class",
            )
        )
    if not config.tokenizer_use_fast:
        problems.append(
            Problem(
                "tokenizer_use_fast",
                "sft needs the fast (Rust) tokenizer: its character offsets make the label masks "
                "exact",
                hint="remove tokenizer_use_fast (every current model ships a fast tokenizer)",
            )
        )
    stand_ins = {
        path: owner
        for owner, keys in plugins.config_keys()
        for path in getattr(keys, "axolotl_integrations", ())
    }
    from sft.config.axolotl import SPEED_ONLY_INTEGRATIONS

    for index, path in enumerate(config.plugins or ()):
        if path in stand_ins:
            continue
        if path in SPEED_ONLY_INTEGRATIONS:
            problems.append(
                Problem(
                    f"plugins[{index}]",
                    f"has no effect in sft: Axolotl's {path.rsplit('.', 1)[-1]} — "
                    f"{SPEED_ONLY_INTEGRATIONS[path]} — only changes speed; sft trains the same "
                    "model without it",
                    hint="remove it to silence this (for MoE speed, set experts_implementation)",
                    warning=True,
                )
            )
            continue
        if path.startswith("axolotl."):
            message = (
                f"{path!r} is an Axolotl integration that no installed sft plugin stands in for"
            )
            hint = (
                "remove it (its keys are then unknown too); the integrations sft covers are "
                "listed in docs/axolotl.md"
            )
        else:
            message = f"{path!r}: sft does not import plugins by path"
            hint = (
                "pip install the sft plugin package; installed plugins are found by entry point "
                "(`sft plugins list`), with no `plugins` entry"
            )
        problems.append(Problem(f"plugins[{index}]", message, hint=hint))
    return problems


def _kernel_problems(config: Config, plugins: SftPlugins) -> list[Problem]:
    """A kernel the config turns on must be able to run on this machine."""
    problems = []
    kernels = plugins.kernels()
    for name, kernel in kernels.items():
        if kernel.enabled_by is None:
            continue
        owner = kernels.owner(name)
        try:
            keys = list(kernel.enabled_by(config))
            ok, reason = kernel.available() if keys else (True, "")
        except Exception as exc:  # the plugin's bug, named as such
            raise PluginError(
                f"plugin {owner!r}: kernel {name!r} raised {type(exc).__name__}: {exc}",
                plugin=owner,
            ) from exc
        if not ok:
            problems.append(
                Problem(
                    keys[0],
                    f"kernel {name!r} (plugin {owner}) is unavailable on this machine: {reason}",
                    hint=f"remove {', '.join(keys)} here",
                    machine=True,
                )
            )
    return problems


def check_config(config: Config, plugins: SftPlugins) -> list[Problem]:
    """Cross-key rules of the core, and the selected components' own checks."""
    problems: list[Problem] = []
    if not config.datasets:
        problems.append(Problem("datasets", "no training dataset: add at least one [[datasets]]"))
    for first, second in (
        ("warmup_steps", "warmup_ratio"),
        ("eval_steps", "evals_per_epoch"),
        ("save_steps", "saves_per_epoch"),
    ):
        if problem := _both(config, first, second):
            problems.append(problem)
    if isinstance(config.warmup_steps, float) and not (
        config.warmup_steps < 1 or config.warmup_steps.is_integer()
    ):
        problems.append(
            Problem(
                "warmup_steps",
                f"{config.warmup_steps:g} is neither a whole number of steps nor a fraction "
                "below 1 of the total steps",
                hint=f"write {math.ceil(config.warmup_steps)} steps, or a fraction such as 0.1",
            )
        )
    problems += _evaluation_schedule_problems(config)
    if config.test_datasets and config.val_set_size:
        problems.append(
            Problem("val_set_size", "conflicts with test_datasets: use one eval source")
        )
    if config.adapter == "qlora" and not config.load_in_4bit:
        problems.append(
            Problem(
                "adapter", "qlora needs the base model in 4-bit", hint="set load_in_4bit = true"
            )
        )
    if config.reinit_weights:
        for name in ("adapter", "load_in_4bit", "load_in_8bit", "model_quantization_config"):
            if getattr(config, name):
                problems.append(
                    Problem(
                        name,
                        "reinit_weights trains random weights from scratch: "
                        + (
                            "an adapter on a random, frozen model learns next to nothing"
                            if name == "adapter"
                            else "quantizing random weights only adds noise to them"
                        ),
                        hint=f"remove {name} (a full fine-tune), or remove reinit_weights",
                    )
                )
    if config.load_in_4bit and config.load_in_8bit:
        problems.append(Problem("load_in_8bit", "conflicts with load_in_4bit: choose one"))
    if config.quantize_moe_experts and not (config.load_in_4bit or config.load_in_8bit):
        problems.append(
            Problem(
                "quantize_moe_experts",
                "quantizes the expert weights to the bits of load_in_4bit or load_in_8bit; "
                "neither is set",
                hint="set load_in_4bit = true (adapter = 'qlora') or load_in_8bit = true",
            )
        )
    if config.quantize_moe_experts and not config.adapter:
        problems.append(
            Problem(
                "quantize_moe_experts",
                "quantized expert weights cannot be trained in full: it needs an adapter",
                hint="set adapter = 'qlora' (or 'lora' with load_in_8bit), and "
                "lora_target_parameters to adapt the experts",
            )
        )
    if config.bf16 is True and config.fp16:
        flag = "bfloat16" if config.bfloat16 is True else "bf16"
        problems.append(Problem("fp16", f"conflicts with {flag} = true: choose one precision"))
    if config.float16:
        problems += [
            Problem(
                "float16",
                f"conflicts with {name} = true: float16 trains in pure float16, {name} in "
                "mixed precision; choose one",
            )
            for name in ("fp16", "bf16")
            if getattr(config, name) is True
        ]
    if config.bfloat16 and config.bf16 is False:
        problems.append(
            Problem(
                "bfloat16",
                f"conflicts with bf16 = false (bfloat16 = {config.bfloat16!r} sets bf16 too)",
            )
        )

    problems += _hardware_and_model_problems(config)
    problems += _output_dir_problems(config)
    problems += _dataset_path_problems(config)
    problems += _shard_problems(config)
    problems += _streaming_problems(config)
    problems += _axolotl_value_problems(config, plugins)
    if config.eval_sample_packing and not config.sample_packing:
        problems.append(
            Problem(
                "eval_sample_packing", "packs eval data only together with sample_packing = true"
            )
        )

    backend = plugins.attention_backends().get(config.attention)
    if config.sample_packing and backend.packing is None:
        problems.append(
            Problem(
                "sample_packing",
                f"attention backend {backend.name!r} cannot keep packed samples apart",
                hint="use attn_implementation = 'sdpa' (or flash_attention_2 on a GPU), or sample_packing = false",
            )
        )
    if config.sample_packing and config.sample_packer not in plugins.packers():
        problems.append(
            Problem("sample_packer", plugins.packers().unknown_message(config.sample_packer))
        )
    optimizer = plugins.optimizers().get(config.optimizer)
    engines = plugins.distributed_backends()
    selected = [engine for _, engine in engines.items() if engine.selected(config)]
    if len(selected) > 1:
        names = " and ".join(engine.name for engine in selected)
        problems.append(
            Problem(
                selected[1].name,
                f"{names} are both selected: a run uses one distributed engine",
                hint=f"remove the {selected[1].name} keys (or the {selected[0].name} ones)",
            )
        )
    objectives = plugins.objectives()
    for registry, component in (
        (plugins.attention_backends(), backend),
        (plugins.optimizers(), optimizer),
        *((engines, engine) for engine in selected),
        *([(objectives, objectives.get(config.objective))] if config.objective else []),
    ):
        if component.check is None:
            continue
        try:
            problems.extend(component.check(config))
        except Exception as exc:  # the plugin's bug, named as such
            owner = registry.owner(component.name)
            raise PluginError(
                f"plugin {owner!r}: the check of {component.name!r} raised {type(exc).__name__}: {exc}",
                plugin=owner,
            ) from exc
    problems += _kernel_problems(config, plugins)
    from sft.config.ineffective import ineffective_key_problems
    from sft.train.tracking import tracking_problems

    problems += ineffective_key_problems(config, plugins)
    problems += tracking_problems(config)
    from sft.train.options import option_problems

    problems += option_problems(config)  # schedules, NEFTune, compile, offloading, RoPE, ...
    return problems


def _streaming_problems(config: Config) -> list[Problem]:
    """`streaming = true` reads the training data while training: what needs it all at once, or
    its length, cannot be used with it."""
    if not config.streaming:
        return []
    problems = []
    if config.max_steps is None:
        problems.append(
            Problem(
                "max_steps",
                "is needed with streaming = true: a stream has no length to count epochs in",
                hint="set max_steps (the optimizer steps to train)",
            )
        )
    if config.num_epochs != 1.0:
        # As in Axolotl (transformers: max_steps wins over num_train_epochs), the run's length
        # is not in doubt: said, not refused.
        problems.append(
            Problem(
                "num_epochs",
                "has no effect with streaming = true: the run lasts max_steps (the stream "
                "starts again when it runs out)",
                hint="remove num_epochs, and set max_steps to the length you want",
                warning=True,
            )
        )
    if config.val_set_size:
        problems.append(
            Problem(
                "val_set_size",
                "cannot hold out part of a stream (streaming = true)",
                hint="put the eval rows in test_datasets (prepared in memory, not streamed), or "
                "set val_set_size = 0",
            )
        )
    if config.dataset_exact_deduplication:
        problems.append(
            Problem(
                "dataset_exact_deduplication",
                "needs every sample at once, which streaming = true never holds",
                hint="remove it (deduplicate the files beforehand), or set streaming = false",
            )
        )
    if config.curriculum_sampling and len(config.datasets) > 1:
        for index, ds in enumerate(config.datasets):
            if ds.weight != 1.0:
                problems.append(
                    Problem(
                        f"datasets[{index}].weight",
                        "a stream mixes its datasets at random by weight, and "
                        "curriculum_sampling reads them one after the other (streaming = true)",
                        hint="remove the weights, or set streaming = false (prepared data "
                        "repeats or samples each dataset by its weight, in order)",
                    )
                )
    for index, ds in enumerate(config.datasets):
        if ds.shards is not None or ds.shards_idx is not None:
            problems.append(
                Problem(
                    f"datasets[{index}].shards",
                    "contiguous pieces need the row count, which a stream does not know "
                    "(streaming = true)",
                    hint="remove shards and shards_idx, and choose files with data_files instead",
                )
            )
    return problems


def _evaluation_schedule_problems(config: Config) -> list[Problem]:
    name = "eval_strategy" if config.eval_strategy is not None else "evaluation_strategy"
    if (
        config.eval_strategy is not None
        and config.evaluation_strategy is not None
        and config.eval_strategy != config.evaluation_strategy
    ):
        return [
            Problem(
                "evaluation_strategy",
                f"conflicts with eval_strategy = {config.evaluation_schedule!r}: it is the older "
                "name of the same key",
                hint="keep only eval_strategy",
            )
        ]
    schedule = config.evaluation_schedule
    has_eval = config.val_set_size > 0 or bool(config.test_datasets)
    if schedule == "no" and has_eval:
        held = "val_set_size" if config.val_set_size > 0 else "test_datasets"
        return [
            Problem(
                name,
                f"'no' would never evaluate the eval set that {held} sets aside ({held} rows "
                "are kept out of training for it)",
                hint=f"remove {held} to train on every row, or remove {name} to evaluate",
            )
        ]
    every = [k for k in ("eval_steps", "evals_per_epoch") if getattr(config, k) is not None]
    if schedule == "epoch" and every:
        return [
            Problem(
                name,
                f"'epoch' conflicts with {every[0]}, which evaluates by steps",
                hint=f"remove {every[0]} to evaluate each epoch, or set {name} = 'steps'",
            )
        ]
    if schedule == "steps" and not every and has_eval:
        return [
            Problem(
                name,
                "'steps' needs eval_steps or evals_per_epoch to say which steps",
                hint="set eval_steps (e.g. 50) or evals_per_epoch",
            )
        ]
    return []
