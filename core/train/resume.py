"""Resume: which checkpoint, what changed since it was written, and what the run does about it.

Every checkpoint holds the run's resolved config (`sft_config.yaml`) and a fingerprint of the
prepared data (`sft_data.json`). Resuming compares them with this run before the model loads:

- adapter shape (`adapter`, `lora_r`, target modules, DoRA, modules to save), the set of trained
  parameters and the optimizer cannot change: the checkpoint's weights or optimizer state would
  not fit. Always refused, naming the key.
- the data (judged by the fingerprint: a moved file with the same content is fine), the model,
  `sequence_len` and packing, batch geometry, `seed`, and the optimizer / schedule keys are
  refused unless `resume_allow_changes = true`. With it, the new learning rate and optimizer
  hyper-parameters are applied on top of the restored optimizer and scheduler (the Trainer would
  otherwise keep the checkpoint's), and what was applied is printed.
- anything else (logging, saving, evaluation, output options) is noted in one line.

Only the training path (`sft.train.run`, `sft.train.trainer`) imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from transformers import TrainerCallback

from sft.config.schema import Config
from sft.errors import ResumeError
from sft.save import RESOLVED_CONFIG, read_resolved_config, write_resolved_config

if TYPE_CHECKING:
    from sft.manager import SftPlugins

CHECKPOINT_DATA = "sft_data.json"
TRAINER_STATE = "trainer_state.json"

# The checkpoint's weights or optimizer state have another shape: this can never work.
ADAPTER_SHAPE_KEYS = (
    "lora_r",
    "lora_target_modules",
    "lora_target_linear",
    "lora_modules_to_save",
    "peft_use_dora",
)
SHAPE_REASONS = {
    "adapter": "the checkpoint holds the weights of another kind of fine-tune",
    **dict.fromkeys(ADAPTER_SHAPE_KEYS, "the checkpoint's adapter weights have another shape"),
    "unfrozen_parameters": "the checkpoint trained another set of parameters",
    "optimizer": "the checkpoint's optimizer state belongs to another optimizer",
}
ADAPTER_KEYS = frozenset((*ADAPTER_SHAPE_KEYS, "lora_alpha", "lora_dropout", "peft_use_rslora"))
# Allowed only with resume_allow_changes = true, each group with why it matters.
DATA_KEYS = frozenset(
    (
        "datasets",
        "test_datasets",
        "val_set_size",
        "excess_length_strategy",
        "invalid_rows",
        "train_on_inputs",
        "shuffle_merged_datasets",
        "curriculum_sampling",
        "dataset_exact_deduplication",
        "special_tokens",
        "tokens",
        "tokenizer_config",
    )
)
MODEL_KEYS = frozenset(
    (
        "base_model",
        "revision_of_model",
        "load_in_4bit",
        "load_in_8bit",
        "quantize_moe_experts",
        "lora_model_dir",
        "rope_scaling",
    )
)
LAYOUT_KEYS = frozenset(
    (
        "sequence_len",
        "sample_packing",
        "sample_packer",
        "sample_packing_sequentially",
        "sample_packing_bin_size",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "seed",
    )
)
SCHEDULE_KEYS = frozenset(
    (
        "learning_rate",
        "lr_scheduler",
        "lr_scheduler_kwargs",
        "lr_div_factor",
        "cosine_min_lr_ratio",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "num_epochs",
        "max_steps",
    )
)
GROUP_REASONS = {
    "data": "the training data differs",
    "model": "another model",
    "adapter": "another adapter setting",
    "layout": "other batches: the checkpoint's data position would skip other samples",
    "schedule": "changes the optimizer or learning-rate schedule mid-run",
}
# Keys that name the resume itself: they differ by design.
IGNORED_KEYS = frozenset(("resume_from_checkpoint", "auto_resume_from_checkpoints"))


@attrs.frozen
class Change:
    key: str
    old: Any
    new: Any
    group: str  # "shape", a GROUP_REASONS key, or "note"

    def render(self) -> str:
        return f"{self.key}: {_show(self.old)} → {_show(self.new)}"


@attrs.frozen
class ResumePlan:
    """The checkpoint to resume from and what differs from it (accepted by the checks)."""

    checkpoint: Path
    changes: tuple[Change, ...] = ()
    recorded: bool = True  # False: an older checkpoint without sft_config.yaml

    @property
    def schedule_changes(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.group == "schedule")

    def summary(self) -> str:
        return ", ".join(c.render() for c in self.changes if c.group != "note")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# -- which checkpoint ---------------------------------------------------------------------------


def resume_point(config: Config, say: Callable[[str], None] = print) -> str | None:
    """The checkpoint this run resumes from: `resume_from_checkpoint`, or the newest one in
    output_dir with `auto_resume_from_checkpoints`; None for a fresh run."""
    from sft.train.output import latest_checkpoint

    if config.resume_from_checkpoint:
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir():
            raise ResumeError(
                f"resume_from_checkpoint: no checkpoint directory {config.resume_from_checkpoint}"
            )
        if (path / TRAINER_STATE).is_file():
            return str(path)
        newest = latest_checkpoint(path)
        if newest is None:
            raise ResumeError(
                f"resume_from_checkpoint = {str(path)!r} is not a checkpoint (it has no "
                f"{TRAINER_STATE}) and holds no checkpoint-N directory\n"
                "  fix: point it at a checkpoint-N directory of an earlier run"
            )
        say(
            f"note: resume_from_checkpoint = {str(path)!r} holds checkpoints; "
            f"resuming from the newest, {newest.name}"
        )
        return str(newest)
    if config.auto_resume_from_checkpoints:
        found = latest_checkpoint(config.output_dir)
        return str(found) if found else None
    return None


# -- what a checkpoint records ------------------------------------------------------------------


def data_fingerprint(*datasets: Any) -> str:
    """A hash of prepared datasets' contents (any chunking gives the same hash).

    Cheap next to training: one pass over the token arrays, no Python per row.
    """
    digest = hashlib.blake2b(digest_size=16)
    for dataset in datasets:
        if dataset is None:
            digest.update(b"<none>")
            continue
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        table = dataset.data.table
        digest.update(f"<dataset {table.num_rows}>".encode())
        for name in sorted(table.column_names):
            column = table.column(name)
            # Separate running hashes of lengths and values: chunk boundaries do not matter.
            lengths = hashlib.blake2b(digest_size=16)
            values = hashlib.blake2b(digest_size=16)
            for chunk in column.chunks:
                if hasattr(chunk, "flatten") and hasattr(chunk, "value_lengths"):
                    lengths.update(chunk.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                    values.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
                else:
                    values.update(chunk.to_numpy(zero_copy_only=False).tobytes())
            header = f"{name}:{column.type}".encode()
            digest.update(header + lengths.digest() + values.digest())
    return digest.hexdigest()


def write_checkpoint_record(directory: Path, config: Config, fingerprint: str) -> None:
    """Write the config and the data fingerprint into a (staged) checkpoint directory."""
    write_resolved_config(config, directory)
    (directory / CHECKPOINT_DATA).write_text(json.dumps({"data_fingerprint": fingerprint}) + "\n")


def _resolved(config: Config) -> dict[str, Any]:
    """The config as the checkpoint stores it (same dump, same redaction, same YAML round trip)."""
    with tempfile.TemporaryDirectory(prefix="sft-resume-") as tmp:
        write_resolved_config(config, Path(tmp))
        return read_resolved_config(Path(tmp)) or {}


# -- what changed --------------------------------------------------------------------------------


def _optimizer_keys(config: Config, plugins: SftPlugins) -> set[str]:
    """The config keys the selected optimizer reads (`Optimizer.keys`, or its plugin's keys)."""
    from sft.config.ineffective import optimizer_keys

    try:
        return optimizer_keys(plugins, config.optimizer)
    except Exception:  # an unknown name was refused when the config loaded
        return set()


def _group(key: str, adapter: bool, optimizer_keys: set[str]) -> str:
    if key == "adapter" or key in ("unfrozen_parameters", "optimizer"):
        return "shape"
    if key in ADAPTER_KEYS:
        if not adapter:
            return "note"  # a full fine-tune has no adapter to change
        return "shape" if key in ADAPTER_SHAPE_KEYS else "adapter"
    if key in SCHEDULE_KEYS or key in optimizer_keys:
        return "schedule"
    if key in LAYOUT_KEYS:
        return "layout"
    if key in MODEL_KEYS:
        return "model"
    if key in DATA_KEYS or key not in attrs.fields_dict(Config):
        return "data"  # plugin keys: judged with the data (a template changes the data)
    return "note"


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(top-level key, shown key, old, new) for every key whose value differs."""
    found = []
    for key in sorted(set(old) | set(new)):
        if key in IGNORED_KEYS or key == "resume_allow_changes":
            continue
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if (
            isinstance(before, list)
            and isinstance(after, list)
            and len(before) == len(after)
            and all(isinstance(e, dict) for e in (*before, *after))
        ):
            for index, (b, a) in enumerate(zip(before, after, strict=True)):
                for name in sorted(set(b) | set(a)):
                    if b.get(name) != a.get(name):
                        found.append((key, f"{key}[{index}].{name}", b.get(name), a.get(name)))
            continue
        found.append((key, key, before, after))
    return found


def check_resume(
    checkpoint: str | Path,
    config: Config,
    fingerprint: str,
    plugins: SftPlugins,
    say: Callable[[str], None] = print,
) -> ResumePlan:
    """Compare the checkpoint's config and data with this run's; refuse what cannot or must not
    silently change (see the module doc). Call it before the model is loaded."""
    checkpoint = Path(checkpoint)
    old = read_resolved_config(checkpoint)
    if old is None:
        say(
            f"note: {checkpoint.name} has no {RESOLVED_CONFIG} (an older sft wrote it): "
            "what changed since cannot be checked"
        )
        return ResumePlan(checkpoint, recorded=False)
    record_path = checkpoint / CHECKPOINT_DATA
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    old_fingerprint = record.get("data_fingerprint")
    data_changed = old_fingerprint is None or old_fingerprint != fingerprint
    adapter = bool(old.get("adapter")) and bool(config.adapter)
    optimizer_keys = _optimizer_keys(config, plugins)

    changes = []
    for key, shown, before, after in _diff(old, _resolved(config)):
        group = _group(key, adapter, optimizer_keys)
        if group == "data" and not data_changed:
            group = "note"  # e.g. a moved file with the same content
        changes.append(Change(shown, before, after, group))
    if old_fingerprint is not None and data_changed:
        changes.append(Change("prepared data (fingerprint)", old_fingerprint, fingerprint, "data"))

    where = f"cannot resume from {checkpoint}"
    shape = [c for c in changes if c.group == "shape"]
    if shape:
        keys = ", ".join(c.key for c in shape)
        lines = [f"{where}: {keys} changed since it was written"]
        lines += [f"  - {c.render()}: {SHAPE_REASONS[c.key]}" for c in shape]
        back = ", ".join(f"{c.key} = {_show(c.old)}" for c in shape)
        lines.append(
            f"  fix: put back {back} to continue that run (resume_allow_changes cannot help), "
            "or start a fresh run with another output_dir"
            + (" (lora_model_dir = a saved adapter continues from its weights)" if adapter else "")
        )
        raise ResumeError("\n".join(lines))
    guarded = [c for c in changes if c.group in GROUP_REASONS]
    if guarded and not config.resume_allow_changes:
        lines = [f"{where}: the config changed since it was written"]
        lines += [f"  - {c.render()} ({GROUP_REASONS[c.group]})" for c in guarded]
        lines.append(
            "  fix: put these keys back to continue that run as it was; or set "
            "resume_allow_changes = true to continue it with the new values (a new learning "
            "rate or optimizer setting is applied from the next step); or start a fresh run "
            "with another output_dir"
        )
        raise ResumeError("\n".join(lines))
    notes = [c for c in changes if c.group == "note"]
    if notes:
        say(f"note: changed since {checkpoint.name}: " + ", ".join(c.render() for c in notes))
    if guarded:
        say(
            f"resuming {checkpoint.name} with changes (resume_allow_changes = true): "
            + ", ".join(c.render() for c in guarded)
        )
    return ResumePlan(checkpoint, tuple(changes))


# -- loading the checkpoint ----------------------------------------------------------------------

_MISFIT = (
    "size mismatch",
    "Error(s) in loading state_dict",
    "doesn't match the size of optimizer's group",
    "different number of parameter groups",
)


@contextlib.contextmanager
def loading_checkpoint(checkpoint: str | None, changes: str = "") -> Iterator[None]:
    """Around the Trainer's checkpoint loading: show transformers' own warnings (missing keys,
    another transformers version), which `quiet_libraries` mutes elsewhere, and turn a checkpoint
    that does not fit the model or optimizer into a `ResumeError` instead of a long traceback."""
    logger = logging.getLogger("transformers.trainer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as error:
        text = str(error)
        if not any(marker in text for marker in _MISFIT):
            raise
        detail = "\n  ".join(
            line.strip()[:200] for line in text.strip().splitlines()[:3] if line.strip()
        )
        changed = f"\n  changed since the checkpoint: {changes}" if changes else ""
        raise ResumeError(
            f"cannot resume from {checkpoint}: its weights or optimizer state do not fit this "
            f"run's model\n  {detail}{changed}\n"
            "  fix: resume with the settings the checkpoint was written with (its "
            f"{RESOLVED_CONFIG}), or start a fresh run with another output_dir"
        ) from error
    finally:
        logger.setLevel(level)


# -- applying new hyper-parameters ---------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return bool(a == b)


def apply_hyperparameters(
    optimizer: Any,
    scheduler: Any,
    model: Any,
    config: Config,
    plugins: SftPlugins,
    apply: bool = True,
) -> list[str]:
    """Put this config's learning rate and optimizer hyper-parameters on a restored optimizer and
    scheduler, at the restored step. Returns what changed, for the user (`apply = False`: only
    what would change).

    The Trainer restores the checkpoint's param groups (lr, weight_decay, betas, ...) and the
    scheduler's `base_lrs`, so without this the checkpoint's values would silently win. A fresh
    optimizer built from this config (no state is allocated before its first step) says what
    the values should be.
    """
    from sft.train.trainer import build_optimizer

    spec = plugins.optimizers().get(config.optimizer)
    if spec.uses_model:  # its factory may hook into the model: never build a second one
        return [
            f"not applied: {spec.name} is built from the model, so a second one cannot be "
            "built to compare its settings; the checkpoint's optimizer settings are kept"
        ]
    fresh = build_optimizer(spec, model, config)
    groups, wanted = optimizer.param_groups, fresh.param_groups
    if len(groups) != len(wanted):
        return [
            f"not applied: the optimizer has {len(groups)} parameter groups, this config {len(wanted)}"
        ]
    applied: list[str] = []
    for index, (group, new) in enumerate(zip(groups, wanted, strict=True)):
        for name, value in new.items():
            if name in ("params", "lr", "initial_lr") or _same(group.get(name), value):
                continue
            applied.append(f"{name} {_show(group.get(name))} → {_show(value)} (group {index})")
            if apply:
                group[name] = value
    new_base = [float(group["lr"]) for group in wanted]
    old_base = [float(b) for b in getattr(scheduler, "base_lrs", [])]
    if new_base != old_base and not apply:
        applied.insert(
            0, f"learning_rate {_show(old_base[0] if old_base else None)} → {_show(new_base[0])}"
        )
    elif new_base != old_base:
        step = scheduler.last_epoch
        if hasattr(scheduler, "lr_lambdas"):
            lrs = [base * fn(step) for base, fn in zip(new_base, scheduler.lr_lambdas, strict=True)]
        else:
            lrs = [
                g["lr"] * new / old if old else new
                for g, new, old in zip(groups, new_base, old_base, strict=True)
            ]
        scheduler.base_lrs = list(new_base)
        for group, base, lr in zip(groups, new_base, lrs, strict=True):
            group["initial_lr"] = base
            group["lr"] = lr
        scheduler._last_lr = list(lrs)  # what the Trainer logs as the step's learning rate
        applied.insert(
            0,
            f"learning_rate {_show(old_base[0] if old_base else None)} → {_show(new_base[0])} "
            f"(lr {lrs[0]:.3g} at step {step})",
        )
    del fresh
    return applied


def make_apply_callback(
    plan: ResumePlan, config: Config, plugins: SftPlugins, console: Any
) -> ApplyResumeChanges:
    """A callback that, once the Trainer has restored the optimizer and scheduler (they are
    loaded before `on_train_begin`), applies this config's values on top of them."""
    return ApplyResumeChanges(plan, config, plugins, console)


class ApplyResumeChanges(TrainerCallback):  # type: ignore[misc]
    """Applies the resumed run's changed hyperparameters to the restored optimizer and
    scheduler, or refuses an older checkpoint whose optimizer state differs from the config."""

    def __init__(self, plan: ResumePlan, config: Config, plugins: SftPlugins, console: Any) -> None:
        self.plan = plan
        self.config = config
        self.plugins = plugins
        self.console = console

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        plan, config, plugins = self.plan, self.config, self.plugins
        if plan.recorded and not plan.schedule_changes:
            return
        if not plan.recorded and not config.resume_allow_changes:
            # An older checkpoint: its config is unknown, its optimizer state tells.
            differ = apply_hyperparameters(
                optimizer, lr_scheduler, model, config, plugins, apply=False
            )
            if differ:
                raise ResumeError(
                    f"cannot resume from {plan.checkpoint}: its optimizer state differs from "
                    "this config: " + "; ".join(differ) + "\n  fix: put these values back, or "
                    "set resume_allow_changes = true to apply the new ones from the next step"
                )
            return
        applied = apply_hyperparameters(optimizer, lr_scheduler, model, config, plugins)
        # The Trainer and the rebuilt schedule already use these; the optimizer's own
        # values (learning rate, weight decay, betas, ...) are in `applied`.
        others = [
            c.render()
            for c in plan.schedule_changes
            if c.key in SCHEDULE_KEYS - {"learning_rate", "weight_decay"}
        ]
        if state.is_world_process_zero and (applied or others):
            self.console.print(
                "applied on resume: " + "; ".join([*applied, *others]),
                markup=False,
                highlight=False,
            )


__all__ = [
    "CHECKPOINT_DATA",
    "ApplyResumeChanges",
    "Change",
    "ResumePlan",
    "apply_hyperparameters",
    "check_resume",
    "data_fingerprint",
    "loading_checkpoint",
    "make_apply_callback",
    "resume_point",
    "write_checkpoint_record",
]
