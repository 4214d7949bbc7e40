"""DeepSpeed ZeRO 1/2/3 through the HF Trainer: `deepspeed = "zero2"` (Axolotl's key).

The value is a shipped preset (`zero1`, `zero2`, `zero3`, `zero3_offload`: JSON files in
`presets/`), a path to a DeepSpeed JSON file (relative to the working directory, `~` expanded),
or an inline table. sft hands the Trainer the resolved table; transformers fills the `"auto"`
values from the run's own settings (micro-batch, accumulation, clipping, bf16/fp16, bucket
sizes from the model's hidden size). On top of that, sft:

- keeps its own optimizer and schedule: the optimizer comes from sft's registry (`optimizer`)
  and the schedule from `lr_scheduler`, exactly as without DeepSpeed. A DeepSpeed config with
  an `optimizer` or `scheduler` section is refused rather than silently overriding those keys.
  With optimizer offload, accelerate swaps a torch AdamW for DeepSpeedCPUAdam (same update, a
  compiled CPU kernel); any other optimizer would be swapped for Adam too, so for those sft sets
  `zero_force_ds_cpu_optimizer = false` and DeepSpeed steps sft's optimizer on the CPU.
- gathers ZeRO-3 weights into one 16-bit state dict at the final save
  (`stage3_gather_16bit_weights_on_model_save = true` unless the config says otherwise), so the
  output loads with plain transformers / peft.
- checkpoints activations with `use_reentrant = true` under DeepSpeed (unless
  `gradient_checkpointing_kwargs` says otherwise): non-reentrant recomputation meets ZeRO-3's
  partitioned parameters and fails with torch's CheckpointError.
- runs a single process without a launcher (DeepSpeed needs a process group: sft sets the
  environment `torchrun --nproc-per-node 1` would).

`sft validate` reports, before any process starts: a missing or invalid JSON file (with its
line), an unknown preset (did you mean), values that contradict sft's keys, ZeRO-3 with a
bitsandbytes-quantized model, and offload that this machine cannot compile or run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sysconfig
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, DistributedBackend
from sft.config.schema import Config, key
from sft.config.structure import describe_value
from sft.errors import ConfigError, Problem
from sft.hardware import installed
from sft.paths import expand_home
from sft.registry import did_you_mean

KEY = "deepspeed"
INSTALL = "pip install 'sft-train[deepspeed]'"
PRESETS = ("zero1", "zero2", "zero3", "zero3_offload")

# Axolotl's deepspeed_configs/*.json, named by a path that does not exist here.
AXOLOTL_FILES = {
    "zero1": "zero1",
    "zero1_torch_compile": "zero1",
    "zero2": "zero2",
    "zero2_torch_compile": "zero2",
    "zero3": "zero3",
    "zero3_bf16": "zero3",
    "zero3_bf16_cpuoffload_all": "zero3_offload",
    "zero3_bf16_cpuoffload_params": "zero3_offload",
    "zero3_cpuoffload": "zero3_offload",
}

# "auto" values transformers fills (HfTrainerDeepSpeedConfig.trainer_config_process/_finalize).
AUTO_FILLED = frozenset(
    {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "fp16.enabled",
        "bf16.enabled",
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
    }
)

# Set to "auto" when a DeepSpeed config leaves them out: DeepSpeed would otherwise run with its
# own defaults (accumulation 1, no clipping) or refuse to start, whatever sft's keys say.
FROM_SFT = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)

GATHER_KEYS = (
    "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
)

# Optimizers accelerate maps to DeepSpeedCPUAdam(adamw_mode=True) under optimizer offload: the
# same update as sft's torch AdamW.
ADAMW = frozenset({"adamw_torch", "adamw_torch_fused"})


@attrs.frozen
class DeepSpeedKeys:
    # `Any`: a preset name or file path (string) or a table; checked in `check`. false, null
    # or "" leave DeepSpeed off (as in Axolotl configs that list the key blank).
    deepspeed: Any = key(
        None,
        doc="DeepSpeed ZeRO: a preset (zero1, zero2, zero3, zero3_offload), a JSON file, or a table.",
        example='"zero2"',
    )


# -- resolving the value -----------------------------------------------------------------------


class _Invalid(Exception):
    """The `deepspeed` value cannot be turned into a DeepSpeed config; carries the problem."""

    def __init__(self, message: str, hint: str | None = None, machine: bool = False) -> None:
        super().__init__(message)
        self.problem = Problem(KEY, message, hint=hint, machine=machine)


def _value(config: Config) -> Any:
    value = config.section(DeepSpeedKeys).deepspeed
    return None if value is None or value is False or value == "" else value


def selected(config: Config) -> bool:
    return _value(config) is not None


def preset_path(name: str) -> Any:
    """The shipped JSON file of a preset (a `Traversable`)."""
    return resources.files(__name__).joinpath("presets", f"{name}.json")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate key {name!r}")
        result[name] = value
    return result


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise _Invalid(
            f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:  # a duplicate key: DeepSpeed refuses those too
        raise _Invalid(f"{where}: {exc}") from None
    if not isinstance(data, dict):
        raise _Invalid(
            f"{where}: a DeepSpeed config is a JSON object ({{...}}), found {type(data).__name__}"
        )
    return data


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~")) or "." in Path(text).name


def load(value: Any) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config a `deepspeed` value names, and where it came from (for messages).

    Raises `_Invalid` naming what is wrong.
    """
    if isinstance(value, dict):
        return copy.deepcopy(value), "the inline table"
    if not isinstance(value, str):
        raise _Invalid(
            f"expected a preset name ({', '.join(PRESETS)}), the path of a DeepSpeed JSON file "
            f"or a table, found {describe_value(value)}"
        )
    if value in PRESETS:
        return _parse(preset_path(value).read_text(encoding="utf-8"), f"preset {value}"), (
            f"preset {value!r}"
        )
    path = Path(expand_home(value) or value)
    if not _looks_like_path(value) and not path.exists():
        guess = did_you_mean(value, PRESETS)
        raise _Invalid(
            f"unknown DeepSpeed preset {value!r}"
            + (f"; did you mean {guess!r}?" if guess else ".")
            + f" Presets: {', '.join(PRESETS)}",
            hint="or give the path of a DeepSpeed JSON file (e.g. ./ds_config.json)",
        )
    if not path.is_file():
        hint = "check the path"
        if not path.is_absolute():
            hint += f"; a relative path is read from the working directory ({Path.cwd()})"
        preset = AXOLOTL_FILES.get(path.stem) if path.suffix == ".json" else None
        if preset:
            hint = f"sft ships this configuration as a preset: deepspeed = {preset!r}"
        what = "is a directory, not a JSON file" if path.is_dir() else "file not found"
        raise _Invalid(f"{what}: {value}", hint=hint, machine=True)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Invalid(f"cannot read {value}: {exc}", machine=True) from None
    return _parse(text, str(value)), str(value)


# -- checking the resolved config --------------------------------------------------------------


def _get(table: dict[str, Any], dotted: str) -> Any:
    node: Any = table
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _autos(table: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            found += _autos(value, dotted + ".")
        elif value == "auto":
            found.append(dotted)
    return found


def zero_stage(ds: dict[str, Any]) -> int:
    stage = _get(ds, "zero_optimization.stage")
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else 0


def _offload_device(ds: dict[str, Any], what: str) -> str:
    device = _get(ds, f"zero_optimization.offload_{what}.device")
    return str(device).lower() if device not in (None, "") else "none"


def _enabled(value: Any) -> bool | None:
    """A DeepSpeed `enabled` flag: True/False when set, None for "auto" or absent."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _prebuilt_op(module: str) -> bool:
    """Whether deepspeed was installed with this op compiled (DS_BUILD_OPS=1 wheels)."""
    from importlib.util import find_spec

    try:
        spec = find_spec("deepspeed")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    package, _, name = module.rpartition("/")
    return any((root / "ops" / package).glob(f"{name}*.so"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _jit_missing() -> list[str]:
    """What compiling a DeepSpeed op just in time needs and this machine lacks."""
    missing = []
    if not _compiler():
        missing.append("a C++ compiler (c++/g++)")
    if not (installed("ninja") or shutil.which("ninja")):
        missing.append("ninja (pip install ninja)")
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        missing.append("the Python headers (python3-dev)")
    return missing


def _offload_problems(config: Config, ds: dict[str, Any]) -> list[Problem]:
    problems = []
    optimizer_device = _offload_device(ds, "optimizer")
    param_device = _offload_device(ds, "param")
    for what, device in (("optimizer", optimizer_device), ("param", param_device)):
        if device not in ("none", "cpu", "nvme"):
            problems.append(
                Problem(
                    KEY,
                    f"zero_optimization.offload_{what}.device = {device!r}: DeepSpeed offloads to "
                    "'cpu' or 'nvme' (or 'none')",
                )
            )
    if param_device != "none" and zero_stage(ds) != 3:
        problems.append(
            Problem(
                KEY,
                f"zero_optimization.offload_param offloads parameters, which only ZeRO stage 3 "
                f"partitions (this config is stage {zero_stage(ds)})",
                hint="use stage 3 (deepspeed = 'zero3_offload'), or offload only the optimizer",
            )
        )
    if "nvme" in (optimizer_device, param_device):
        for what, device in (("optimizer", optimizer_device), ("param", param_device)):
            if device == "nvme" and not _get(ds, f"zero_optimization.offload_{what}.nvme_path"):
                problems.append(
                    Problem(
                        KEY, f"zero_optimization.offload_{what} offloads to nvme: set its nvme_path"
                    )
                )
        libaio = Path("/usr/include/libaio.h").exists()
        if not _prebuilt_op("aio/async_io_op") and (_jit_missing() or not libaio):
            problems.append(
                Problem(
                    KEY,
                    "NVMe offload needs DeepSpeed's async_io op, which is not built here and "
                    "cannot be: "
                    + ", ".join(_jit_missing() + ([] if libaio else ["libaio (libaio-dev)"])),
                    hint="install libaio-dev and a compiler, or offload to 'cpu'",
                    machine=True,
                )
            )
    if optimizer_device == "none":
        return problems

    force = ds.get("zero_force_ds_cpu_optimizer")
    if config.optimizer in ADAMW:
        if force is not False and not _prebuilt_op("adam/cpu_adam_op"):
            missing = _jit_missing()
            if missing:
                problems.append(
                    Problem(
                        KEY,
                        "optimizer offload steps AdamW with DeepSpeedCPUAdam, compiled on first "
                        f"use; this machine lacks {', '.join(missing)}",
                        hint="install them, or set zero_force_ds_cpu_optimizer = false in the "
                        "DeepSpeed config to step torch AdamW on the CPU (slower)",
                        machine=True,
                    )
                )
    elif force is True:
        problems.append(
            Problem(
                KEY,
                "zero_force_ds_cpu_optimizer = true replaces the offloaded optimizer with "
                f"DeepSpeedCPUAdam, not optimizer = {config.optimizer!r}",
                hint="remove zero_force_ds_cpu_optimizer (sft then steps its own optimizer on the "
                "CPU), or use optimizer = 'adamw_torch'",
            )
        )
    if (
        "bnb" in config.optimizer
        or config.optimizer.endswith("_8bit")
        or config.optimizer.startswith("paged_")
    ):
        problems.append(
            Problem(
                KEY,
                f"optimizer = {config.optimizer!r} is a bitsandbytes optimizer (CUDA kernels); "
                "with offload_optimizer its state lives in CPU memory, and accelerate would "
                "replace it with DeepSpeedCPUAdam",
                hint="use optimizer = 'adamw_torch' with offload, or drop offload_optimizer",
            )
        )
    return problems


def _consistency_problems(config: Config, ds: dict[str, Any]) -> list[Problem]:
    """DeepSpeed values that contradict sft's own keys (transformers would fail at step 0)."""
    problems = []
    for ds_key, sft_key, value in (
        ("train_micro_batch_size_per_gpu", "micro_batch_size", config.micro_batch_size),
        (
            "gradient_accumulation_steps",
            "gradient_accumulation_steps",
            config.gradient_accumulation_steps,
        ),
        ("gradient_clipping", "max_grad_norm", config.max_grad_norm),
    ):
        found = ds.get(ds_key)
        if found is None or found == "auto":
            continue
        if not isinstance(found, (int, float)) or isinstance(found, bool) or found != value:
            problems.append(
                Problem(
                    KEY,
                    f"{ds_key} = {found!r} in the DeepSpeed config, but {sft_key} = {value!r}",
                    hint=f'set {ds_key} to "auto" (sft fills it from {sft_key}) or remove it',
                )
            )
    bf16, fp16 = _enabled(_get(ds, "bf16.enabled")), _enabled(_get(ds, "fp16.enabled"))
    if bf16 and fp16:
        problems.append(Problem(KEY, "enables both bf16 and fp16: choose one"))
    if bf16 is True and (config.bf16 is False or config.fp16):
        problems.append(
            Problem(
                KEY,
                "bf16.enabled = true in the DeepSpeed config, but this config does not train in bf16",
                hint='set bf16.enabled to "auto" (sft fills it from bf16/fp16), or bf16 = true',
            )
        )
    if fp16 is True and not config.fp16:
        problems.append(
            Problem(
                KEY,
                "fp16.enabled = true in the DeepSpeed config, but fp16 = false here",
                hint='set fp16.enabled to "auto" (sft fills it from fp16), or fp16 = true',
            )
        )
    if bf16 is False and config.bf16 is True:
        problems.append(
            Problem(
                KEY,
                "bf16.enabled = false in the DeepSpeed config, but bf16 = true here",
                hint='set bf16.enabled to "auto"',
            )
        )
    if fp16 is False and config.fp16:
        problems.append(
            Problem(
                KEY,
                "fp16.enabled = false in the DeepSpeed config, but fp16 = true here",
                hint='set fp16.enabled to "auto"',
            )
        )
    return problems


def check_table(config: Config, ds: dict[str, Any], source: str) -> list[Problem]:
    """Problems of a resolved DeepSpeed config against this sft config (no deepspeed import)."""
    problems = []
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        problems.append(
            Problem(
                KEY,
                f"{source} has no zero_optimization table (accelerate needs one)",
                hint="add zero_optimization = {stage = 2}, or use a preset: " + ", ".join(PRESETS),
            )
        )
    else:
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            problems.append(
                Problem(KEY, f"zero_optimization.stage = {stage!r}: ZeRO stages are 0, 1, 2 and 3")
            )
    for section, owner in (
        ("optimizer", "its optimizer key (now {optimizer!r}), learning_rate and weight_decay"),
        ("scheduler", "lr_scheduler (now {lr_scheduler!r}), warmup_steps / warmup_ratio"),
    ):
        if section in ds:
            problems.append(
                Problem(
                    KEY,
                    f"{source} has a section {section!r}; sft builds the {section} from "
                    + owner.format(optimizer=config.optimizer, lr_scheduler=config.lr_scheduler)
                    + ", with or without DeepSpeed",
                    hint=f"remove the {section!r} section from the DeepSpeed config",
                )
            )
    for dotted in _autos(ds):
        if dotted not in AUTO_FILLED and not dotted.startswith(("optimizer.", "scheduler.")):
            problems.append(
                Problem(
                    KEY,
                    f'{dotted} = "auto" in {source}, but nothing fills it',
                    hint='"auto" is filled for: ' + ", ".join(sorted(AUTO_FILLED)),
                )
            )
    if zero_stage(ds) == 3:
        for flag in ("load_in_4bit", "load_in_8bit"):
            if getattr(config, flag):
                problems.append(
                    Problem(
                        KEY,
                        f"ZeRO-3 partitions parameters, which it cannot do with a bitsandbytes "
                        f"{'4' if flag == 'load_in_4bit' else '8'}-bit model ({flag} = true)",
                        hint=f"use deepspeed = 'zero2' with {flag}, or drop {flag} for ZeRO-3",
                    )
                )
    problems += _consistency_problems(config, ds)
    problems += _offload_problems(config, ds)
    return problems


def check(config: Config) -> Sequence[Problem]:
    """`sft validate`: the value resolves, and the DeepSpeed config fits this sft config."""
    value = _value(config)
    if value is None:
        return []
    problems = []
    if not installed("deepspeed"):
        problems.append(Problem(KEY, "DeepSpeed is not installed", hint=INSTALL, machine=True))
    try:
        ds, source = load(value)
    except _Invalid as exc:
        return [*problems, exc.problem]
    return problems + check_table(config, ds, source)


# -- what the Trainer gets ---------------------------------------------------------------------


def build(config: Config) -> dict[str, Any]:
    """The DeepSpeed config handed to `TrainingArguments(deepspeed=...)`.

    The resolved table, plus: batch, accumulation and clipping follow sft's keys ("auto") when
    it leaves them out; ZeRO-3 gathers 16-bit weights on save unless it says otherwise;
    with optimizer offload and an optimizer other than AdamW, `zero_force_ds_cpu_optimizer =
    false` so DeepSpeed keeps sft's optimizer.
    """
    value = _value(config)
    if value is None:
        raise ValueError("deepspeed is not set in this config")
    try:
        ds, source = load(value)
    except _Invalid as exc:
        raise ConfigError([exc.problem], config.source) from None
    problems = check_table(config, ds, source)
    if problems:
        raise ConfigError(problems, config.source)
    for name in FROM_SFT:  # absent, DeepSpeed would not follow sft's batch and clipping
        ds.setdefault(name, "auto")
    zero = ds.setdefault("zero_optimization", {})
    if zero_stage(ds) == 3 and not any(name in zero for name in GATHER_KEYS):
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if (
        _offload_device(ds, "optimizer") != "none"
        and config.optimizer not in ADAMW
        and "zero_force_ds_cpu_optimizer" not in ds
    ):
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def _single_process_environment() -> None:
    """Without a launcher, DeepSpeed looks for MPI to find its peers: be rank 0 of 1 instead."""
    if any(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        {
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": os.environ.get("MASTER_PORT", str(port)),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }
    )


def _precision_problems(config: Config, ds: dict[str, Any]) -> list[Problem]:
    """`bf16 = auto` resolves on this machine: compare what DeepSpeed was told explicitly."""
    import torch

    from sft.model import resolve_dtype

    dtype = resolve_dtype(config)
    for name, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        flag = _enabled(_get(ds, f"{name}.enabled"))
        if flag is not None and flag != (dtype == wanted):
            return [
                Problem(
                    KEY,
                    f"{name}.enabled = {str(flag).lower()} in the DeepSpeed config, but this run "
                    f"trains in {str(dtype).removeprefix('torch.')} here",
                    hint=f'set {name}.enabled to "auto" (sft fills it from bf16/fp16)',
                )
            ]
    return []


def _batch_problems(config: Config, ds: dict[str, Any]) -> list[Problem]:
    from sft.distributed import world_size

    found = ds.get("train_batch_size")
    if found is None or found == "auto":
        return []
    total = config.micro_batch_size * config.gradient_accumulation_steps * world_size()
    if found != total:
        return [
            Problem(
                KEY,
                f"train_batch_size = {found!r} in the DeepSpeed config, but micro_batch_size × "
                f"gradient_accumulation_steps × {world_size()} processes = {total}",
                hint='set train_batch_size to "auto"',
            )
        ]
    return []


def training_args(config: Config, model: Any) -> dict[str, Any]:
    """`TrainingArguments` keywords: the DeepSpeed table, and reentrant activation checkpoints."""
    ds = build(config)
    problems = _precision_problems(config, ds) + _batch_problems(config, ds)
    if problems:
        raise ConfigError(problems, config.source)
    _single_process_environment()
    args: dict[str, Any] = {"deepspeed": ds}
    if config.gradient_checkpointing:
        # The Trainer re-enables checkpointing on the model with these at the start of train().
        options = {"use_reentrant": True, **(config.gradient_checkpointing_kwargs or {})}
        args["activation_checkpointing"] = True
        args["activation_checkpointing_kwargs"] = options
    return args


def available() -> tuple[bool, str]:
    if installed("deepspeed"):
        return True, ""
    return False, INSTALL


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(DeepSpeedKeys)]


@hookimpl
def sft_register_distributed_backends(register: Callable[[DistributedBackend], None]) -> None:
    register(
        DistributedBackend(
            name="deepspeed",
            selected=selected,
            training_args=training_args,
            check=check,
            available=available,
            description="DeepSpeed ZeRO 1/2/3 (+ CPU offload) through the HF Trainer",
        )
    )
