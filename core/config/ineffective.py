"""Keys that would be accepted and change nothing: each becomes an error or a warning saying why.

A key left at its default, or blank (null, "", an empty list or table), is not "set" and is never
reported. An error is for what is surely a mistake (LoRA keys without an adapter would be a
silent full fine-tune; `split = "test"` on a JSONL file would train on the whole file); a
warning (`Problem.warning`) for what is harmless but does nothing (`eval_steps` without an eval
set). Plugins report their own keys the same way from `sft_validate_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sft.config.schema import Config, DatasetConfig
from sft.errors import Problem

if TYPE_CHECKING:
    from sft.manager import SftPlugins

# Keys that configure the adapter, and so need one (`loraplus_*` only where declared).
LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "lora_target_parameters",
    "lora_modules_to_save",
    "peft_use_dora",
    "peft_use_rslora",
    "loraplus_lr_ratio",
    "loraplus_lr_embedding",
)
# A saved adapter (`lora_model_dir`) brings its own value of these: adapter_config.json field.
SAVED_ADAPTER_FIELDS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_target_linear": "target_modules",
    "lora_target_parameters": "target_parameters",
    "lora_modules_to_save": "modules_to_save",
    "peft_use_dora": "use_dora",
    "peft_use_rslora": "use_rslora",
}
EVAL_KEYS = (
    "eval_steps",
    "evals_per_epoch",
    "eval_strategy",
    "evaluation_strategy",
    "eval_batch_size",
    "eval_sample_packing",
)
# Schedules with a floor that `cosine_min_lr_ratio` sets, and schedules without warmup.
MIN_LR_SCHEDULERS = ("cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "rex")
NO_WARMUP_SCHEDULERS = ("constant",)


def is_set(owner: Any, name: str) -> bool:
    """Whether key `name` of `owner` (a config, dataset entry or plugin section) holds a value
    other than its default and other than blank."""
    fields = attrs.fields_dict(type(owner))
    if name not in fields:
        return False
    value = getattr(owner, name)
    if value is None or value == "" or value == () or value == {}:
        return False
    return bool(value != fields[name].default)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return repr(value)


def ineffective_key_problems(config: Config, plugins: SftPlugins) -> list[Problem]:
    """Every core key of `config` that is set but would change nothing."""
    return [
        *_adapter_problems(config),
        *_eval_problems(config),
        *_best_model_problems(config),
        *_schedule_problems(config),
        *_optimizer_problems(config, plugins),
        *_dataset_problems(config),
        *_sampling_problems(config),
        *_quantization_problems(config),
    ]


BNB_4BIT_KEYS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


def _quantization_problems(config: Config) -> list[Problem]:
    problems = []
    if config.experts_implementation == "scattermoe":
        problems.append(
            Problem(
                "experts_implementation",
                "'scattermoe' is Axolotl's own ScatterMoE kernels: sft computes the experts with "
                "transformers' default implementation, the same result (only speed differs)",
                hint="set grouped_mm (or leave the key out) to silence this",
                warning=True,
            )
        )
    if config.model_quantization_config and (config.load_in_4bit or config.load_in_8bit):
        flag = "load_in_4bit" if config.load_in_4bit else "load_in_8bit"
        problems.append(
            Problem(
                "model_quantization_config",
                f"conflicts with {flag}: the model loads with one quantization config",
                hint=f"remove one of model_quantization_config and {flag}",
            )
        )
    if is_set(config, "model_quantization_config_kwargs") and not config.model_quantization_config:
        problems.append(
            Problem(
                "model_quantization_config_kwargs",
                "has no effect: model_quantization_config is not set",
                hint="set model_quantization_config (e.g. 'Mxfp4Config'), or remove this",
                warning=True,
            )
        )
    unused = [k for k in (*BNB_4BIT_KEYS, "bnb_config_kwargs") if is_set(config, k)]
    if not config.load_in_4bit:
        unused = [k for k in unused if k == "bnb_config_kwargs" and not config.load_in_8bit] + [
            k for k in unused if k != "bnb_config_kwargs"
        ]
        for name in unused:
            needs = (
                "load_in_4bit or load_in_8bit" if name == "bnb_config_kwargs" else "load_in_4bit"
            )
            problems.append(
                Problem(
                    name,
                    f"has no effect: it configures bitsandbytes quantization, and {needs} is "
                    "not set",
                    hint=f"set {needs}, or remove {name}",
                    warning=True,
                )
            )
    return problems


def _sampling_problems(config: Config) -> list[Problem]:
    if config.group_by_length and config.curriculum_sampling:
        return [
            Problem(
                "group_by_length",
                "conflicts with curriculum_sampling: one trains in dataset order, the other "
                "batches samples by length",
                hint="remove one of them",
            )
        ]
    if not config.group_by_length or not (config.sample_packing or config.streaming):
        return []
    which = "sample_packing" if config.sample_packing else "streaming"
    why = (
        "the packer's bins make the batches"
        if config.sample_packing
        else "a stream is read in order"
    )
    return [
        Problem(
            "group_by_length",
            f"has no effect with {which} = true: {why}",
            hint="remove group_by_length",
            warning=True,
        )
    ]


# -- adapter -----------------------------------------------------------------------------------


def _adapter_problems(config: Config) -> list[Problem]:
    if not config.adapter:
        # `adapter:` written blank chooses a full fine-tune (Axolotl's examples keep their LoRA
        # keys beside it): the keys are said to do nothing. With no `adapter` key at all, LoRA
        # keys more likely mean a forgotten adapter, and a silent full fine-tune is refused.
        chosen = config.given_blank("adapter")
        return [
            Problem(
                name,
                "has no effect: adapter is blank, so this is a full fine-tune"
                if chosen
                else "has no effect: no adapter is set, so this is a full fine-tune",
                hint=f"set adapter = 'lora' to train a LoRA adapter, or remove {name}",
                warning=chosen,
            )
            for name in LORA_KEYS
            if is_set(config, name)
        ]
    if config.lora_model_dir:
        return _saved_adapter_problems(config)
    return []


def _saved_adapter_problems(config: Config) -> list[Problem]:
    """LoRA keys beside `lora_model_dir`: the saved adapter's own adapter_config.json applies.
    A value that differs from the saved one is an error; when the saved config cannot be read
    here (a Hub id), a warning."""
    assert config.lora_model_dir is not None
    names = [name for name in SAVED_ADAPTER_FIELDS if is_set(config, name)]
    if not names:
        return []
    saved = _read_adapter_config(config.lora_model_dir)
    problems = []
    for name in names:
        value = getattr(config, name)
        field = SAVED_ADAPTER_FIELDS[name]
        if saved is None:
            problems.append(
                Problem(
                    name,
                    "is not applied: the adapter in lora_model_dir keeps the settings it was "
                    "saved with (its adapter_config.json)",
                    hint=f"remove {name}",
                    warning=True,
                )
            )
            continue
        kept = saved.get(field)
        if name != "lora_target_linear" and _same(value, kept):
            continue  # says what the saved adapter has anyway
        problems.append(
            Problem(
                name,
                f"= {_show(value)} has no effect: the adapter in lora_model_dir keeps "
                f"{field} = {_show(kept)} (its adapter_config.json)",
                hint=f"remove {name}; to train a new adapter with it, remove lora_model_dir",
            )
        )
    return problems


def _read_adapter_config(directory: str) -> dict[str, Any] | None:
    path = Path(directory).expanduser() / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same(value: Any, saved: Any) -> bool:
    if isinstance(value, tuple):
        return isinstance(saved, (list, tuple)) and set(value) == set(saved)
    if isinstance(value, float) and isinstance(saved, (int, float)):
        return abs(value - saved) < 1e-12
    return bool(value == saved)


# -- eval and schedule -------------------------------------------------------------------------


def _best_model_problems(config: Config) -> list[Problem]:
    problems = []
    best = config.load_best_model_at_end or config.early_stopping_patience
    saves_best = config.checkpoint_strategy == "best"
    has_eval = config.val_set_size > 0 or config.test_datasets
    if saves_best and not has_eval:
        problems.append(
            Problem(
                "save_strategy",
                "'best' saves a checkpoint at each evaluation that improves the metric, and there "
                "is no eval set",
                hint="set val_set_size (e.g. 0.05) or add [[test_datasets]], or use "
                "save_strategy = 'steps'",
            )
        )
    for name in ("early_stopping_patience", "load_best_model_at_end"):
        if is_set(config, name) and not has_eval:
            problems.append(
                Problem(
                    name,
                    "needs evaluations to rank checkpoints, and there is no eval set",
                    hint="set val_set_size (e.g. 0.05) or add [[test_datasets]]",
                )
            )
    if best and config.checkpoint_strategy == "no":
        problems.append(
            Problem(
                "save_strategy",
                "no checkpoints are saved, so there is no best one to end with "
                "(load_best_model_at_end / early_stopping_patience)",
                hint="save checkpoints at evaluation steps (e.g. save_steps = eval_steps)",
            )
        )
    if best and config.save_steps and config.eval_steps and config.save_steps % config.eval_steps:
        problems.append(
            Problem(
                "save_steps",
                f"{config.save_steps} is not a multiple of eval_steps ({config.eval_steps}): "
                "the best checkpoint is chosen among the saved ones at evaluation steps",
                hint=f"set save_steps to a multiple of {config.eval_steps}",
            )
        )
    for name in ("metric_for_best_model", "greater_is_better"):
        if is_set(config, name) and not (best or saves_best):
            problems.append(
                Problem(
                    name,
                    "has no effect: nothing picks a best checkpoint "
                    "(load_best_model_at_end and early_stopping_patience are not set)",
                    hint="set load_best_model_at_end = true or early_stopping_patience, or "
                    f"remove {name}",
                    warning=True,
                )
            )
    return problems


def _eval_problems(config: Config) -> list[Problem]:
    if config.val_set_size > 0 or config.test_datasets:
        return []
    problems = []
    for name in EVAL_KEYS:
        if not is_set(config, name):
            continue
        if name == "eval_sample_packing" and not config.sample_packing:
            continue  # reported by the core checks: it needs sample_packing
        if name.endswith("_strategy") and config.evaluation_schedule == "no":
            continue  # 'no' without an eval set says what the run does
        problems.append(
            Problem(
                name,
                "has no effect: there is no eval set (val_set_size is 0 and there are no "
                "test_datasets)",
                hint=f"set val_set_size (e.g. 0.05) or add [[test_datasets]], or remove {name}",
                warning=True,
            )
        )
    return problems


def _schedule_problems(config: Config) -> list[Problem]:
    problems = []
    scheduler = config.lr_scheduler
    if config.cosine_min_lr_ratio is not None and scheduler not in MIN_LR_SCHEDULERS:
        problems.append(
            Problem(
                "cosine_min_lr_ratio",
                f"has no effect with lr_scheduler = {scheduler!r}: it is the floor of the "
                "cosine schedule",
                hint="set lr_scheduler = 'cosine', or remove cosine_min_lr_ratio",
            )
        )
    # Schedule-free optimizers (hf_optim) take warmup_steps themselves.
    if scheduler in NO_WARMUP_SCHEDULERS and not config.optimizer.startswith("schedule_free_"):
        for name in ("warmup_steps", "warmup_ratio"):
            if getattr(config, name):  # 0 warms up nothing either way
                problems.append(
                    Problem(
                        name,
                        f"has no effect: lr_scheduler = {scheduler!r} has no warmup",
                        hint=f"set lr_scheduler = 'constant_with_warmup', or remove {name}",
                    )
                )
    return problems


# -- optimizer ---------------------------------------------------------------------------------


def optimizer_keys(plugins: SftPlugins, name: str) -> set[str]:
    """The config keys optimizer `name` reads: those its `Optimizer.keys` lists, or else every
    key declared by the plugin that registers it."""
    registry = plugins.optimizers()
    component = registry.get(name)
    keys = getattr(component, "keys", None)
    if keys is not None:
        return set(keys)
    owner = registry.owner(name)
    return {
        field
        for plugin, group in plugins.config_keys(strict=False)
        if plugin == owner and group.scope == "root"
        for field in attrs.fields_dict(group.cls)
    }


def _optimizer_problems(config: Config, plugins: SftPlugins) -> list[Problem]:
    """Keys of optimizers other than the selected one (`adam_beta2` with `optimizer = "sgd"`)."""
    registry = plugins.optimizers()
    if config.optimizer not in registry:
        return []  # refused when the config loaded
    readers: dict[str, list[str]] = {}
    for name in registry.names():
        for key in optimizer_keys(plugins, name):
            readers.setdefault(key, []).append(name)
    if getattr(registry.get(config.optimizer), "keys", None) is None:
        return []  # it may read keys beyond its plugin's: nothing is judged unread
    used = optimizer_keys(plugins, config.optimizer)
    problems = []
    for key in sorted(readers):
        if key in used or not _config_has(config, key) or not is_set(_owner(config, key), key):
            continue
        names = ", ".join(readers[key])
        problems.append(
            Problem(
                key,
                f"has no effect: optimizer {config.optimizer!r} does not use it (it is read by "
                f"{names})",
                hint=f"remove {key}, or choose one of those optimizers",
            )
        )
    return problems


def _config_has(config: Config, key: str) -> bool:
    try:
        getattr(config, key)
    except AttributeError:
        return False
    return True


def _owner(config: Config, key: str) -> Any:
    """The object holding `key`: the config itself or a plugin section."""
    if key in attrs.fields_dict(Config):
        return config
    for section in config._sections.values():
        if key in attrs.fields_dict(type(section)):
            return section
    return config


# -- datasets ----------------------------------------------------------------------------------


def _dataset_problems(config: Config) -> list[Problem]:
    problems = []
    for where, ds in config.all_datasets():
        problems += _source_key_problems(ds, where)
    return problems


def _source_key_problems(ds: DatasetConfig, where: str) -> list[Problem]:
    """`name`, `revision` and `split` choose a Hub dataset's configuration, commit and split
    (`datasets.load_dataset`). Files sft reads itself (a local file, a directory of data files,
    any URL) and a saved dataset (`save_to_disk`) are read whole: there they change nothing."""
    asked = [key for key in ("name", "revision", "split") if is_set(ds, key)]
    if not asked:
        return []
    reading = _how_read(ds)
    if reading == "datasets":
        return []
    what = (
        "a saved dataset is loaded whole"
        if reading == "saved"
        else "its files are read whole, as one split"
    )
    return [
        Problem(
            f"{where}.{key}",
            f"= {getattr(ds, key)!r} has no effect on {ds.path}: {what}",
            hint=(
                "remove split (for an eval set use val_set_size or [[test_datasets]])"
                if key == "split"
                else f"remove {key}: it applies to Hub datasets"
            ),
        )
        for key in asked
    ]


def _how_read(ds: DatasetConfig) -> str:
    """How `sft.data.sources.read_rows` reads this entry: "files" (sft reads the files),
    "saved" (`datasets.load_from_disk` of one saved dataset), or "datasets"
    (`datasets.load_dataset`, which uses name, revision and split)."""
    from sft.data.sources import _list_files, _looks_like_saved_dataset

    path = ds.path
    if "://" in path:
        return "files"
    local = Path(path).expanduser()
    if not local.exists():
        return "datasets"  # a Hub id (a missing local file is reported on its own)
    if not local.is_dir():
        return "files"
    if _looks_like_saved_dataset(local):
        return "saved"
    try:
        files = _list_files(str(local), ds)
    except Exception:  # e.g. a data_files pattern matching nothing: reported when reading
        return "datasets"
    return "files" if files else "datasets"
