"""`relora`: Axolotl's ReLoRA (Lialin et al., https://arxiv.org/abs/2307.05695) and its jagged
learning-rate restarts.

ReLoRA (`relora = true`, LoRA or QLoRA): every `jagged_restart_steps` optimizer steps the LoRA
update is merged into the base weights and LoRA starts again (A random, B zero, so the model's
output does not change), and the adapter's optimizer state is pruned (`relora_prune_method`:
`magnitude` keeps the largest `1 - relora_prune_ratio` of each state tensor, `random` a random
share, `reset` a random 0.1%), so a sequence of low-rank updates adds up to a high-rank one.
The result is a full model (the base with every update merged), saved as such.

A 4-bit (QLoRA) base is not re-rounded from its own rounded weights, which would drop every
update smaller than half a rounding step: sft keeps the sum of the merged updates (on the CPU,
in the adapter's dtype) and rounds `original + sum` at each restart; the final model is the
full-precision base (loaded again on the CPU) + that sum + the last adapter.

Jagged restarts (`jagged_restart_steps`, with or without ReLoRA): the run's learning-rate schedule
times a factor that drops to 0.001 (a cosine schedule's cosine_min_lr_ratio, when set) at each
restart, ramps back up over `jagged_restart_warmup_steps` (default 10; 0 is read as 10, as in
Axolotl) and down over the `jagged_restart_anneal_steps` before the next restart (default 1:
none). Axolotl's formula.

Checkpoints hold what the merges changed (`relora/`: the merged base weights, or for a 4-bit base
the sum of updates), so a resumed run continues from the same model. One process only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.errors import Problem

# The optimizers whose state ReLoRA knows how to prune: AdamW's moments, in torch's layout or
# bitsandbytes' (8-bit blocks or 32-bit).
RELORA_OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)
PRUNE_DEFAULT = {"magnitude": 0.9, "random": 0.9, "reset": 0.999}  # Axolotl's defaults


@attrs.frozen
class ReloraKeys:
    relora: bool = key(
        False,
        doc="ReLoRA: every jagged_restart_steps steps merge the LoRA update into the base, "
        "restart LoRA and prune its optimizer state; the result is a full model (LoRA/QLoRA, "
        "one process).",
    )
    relora_prune_ratio: float | None = key(
        None,
        ge=0.0,
        le=0.9999,
        doc="ReLoRA: share of the adapter's optimizer state zeroed at each restart (default "
        "0.9; 0.999 with relora_prune_method = 'reset').",
    )
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = key(
        None,
        doc="ReLoRA: which optimizer state is zeroed at restarts: the smallest (magnitude, "
        "default), a random share (random), or nearly all (reset).",
    )
    relora_cpu_offload: bool = key(
        False, doc="ReLoRA: compute the merges of a 4-bit base on the CPU (less GPU memory)."
    )
    jagged_restart_steps: int | None = key(
        None,
        ge=1,
        doc="Restart the learning-rate schedule's factor every N optimizer steps (ReLoRA's "
        "restarts).",
    )
    jagged_restart_warmup_steps: int | None = key(
        None, ge=0, doc="Steps the factor ramps back up after each restart (default 10)."
    )
    jagged_restart_anneal_steps: int | bool | None = key(
        None,
        doc="Steps the factor ramps down before each restart (default 1: no ramp; 0 or false "
        "read as 1, as in Axolotl).",
    )


def keys_of(config: Config) -> ReloraKeys:
    return config.section(ReloraKeys)


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(ReloraKeys)]


def _no_effect(name: str, why: str, fix: str) -> Problem:
    return Problem(name, f"has no effect: {why}", hint=fix, warning=True)


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    from sft.config.ineffective import is_set

    keys = keys_of(config)
    problems: list[Problem] = []
    anneal = keys.jagged_restart_anneal_steps
    if not isinstance(anneal, bool) and isinstance(anneal, int) and anneal < 0:
        problems.append(
            Problem("jagged_restart_anneal_steps", f"expected an integer ≥ 0, found {anneal}")
        )
    if not keys.jagged_restart_steps:
        for name in ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps"):
            if is_set(keys, name):
                problems.append(
                    _no_effect(name, "jagged_restart_steps is not set", "set it, or remove this")
                )
    if not keys.relora:
        for name in ("relora_prune_ratio", "relora_prune_method", "relora_cpu_offload"):
            if is_set(keys, name):
                problems.append(_no_effect(name, "relora is not true", f"remove {name}"))
        return problems + _schedule_problems(config)
    if keys.relora_cpu_offload and not config.load_in_4bit:
        problems.append(
            _no_effect(
                "relora_cpu_offload",
                "it moves the merges of a 4-bit base to the CPU, and this base is not 4-bit",
                "remove relora_cpu_offload",
            )
        )
    if not keys.jagged_restart_steps:
        problems.append(
            Problem(
                "relora",
                "needs jagged_restart_steps: the number of optimizer steps between restarts",
                hint="e.g. jagged_restart_steps = 150",
            )
        )
    if config.adapter not in ("lora", "qlora"):
        problems.append(
            Problem(
                "relora",
                f"merges a LoRA adapter into the model, and this run has adapter = "
                f"{config.adapter!r}",
                hint="set adapter = 'lora' (or 'qlora' with load_in_4bit), or remove relora",
            )
        )
    for name, why in (
        ("peft_use_dora", "DoRA's magnitude vector does not merge and restart like LoRA"),
        ("lora_model_dir", "ReLoRA starts LoRA from scratch at each restart"),
        ("load_in_8bit", "sft merges ReLoRA's updates into 4-bit (QLoRA) or float bases only"),
        ("deepspeed", "ReLoRA runs in one process"),
        ("lora_target_parameters", "ReLoRA merges LoRA on linear and embedding layers only"),
        (
            "load_best_model_at_end",
            "the best checkpoint's adapter would be loaded onto the latest merged base",
        ),
        (
            "early_stopping_patience",
            "it reloads the best checkpoint's adapter onto the latest merged base",
        ),
        ("reinit_weights", "the final model is rebuilt from the base checkpoint's weights"),
    ):
        if getattr(config, name, None):
            problems.append(Problem(name, f"cannot be used with relora: {why}"))
    fsdp = getattr(config, "fsdp_version", None) or getattr(config, "fsdp_config", None)
    if fsdp:
        problems.append(Problem("relora", "runs in one process: not with FSDP"))
    if config.optimizer not in RELORA_OPTIMIZERS:
        problems.append(
            Problem(
                "optimizer",
                f"{config.optimizer!r} cannot be used with relora: ReLoRA prunes AdamW's "
                "optimizer state at each restart",
                hint="one of " + ", ".join(RELORA_OPTIMIZERS),
            )
        )
    return problems + _schedule_problems(config)


def _schedule_problems(config: Config) -> list[Problem]:
    if keys_of(config).jagged_restart_steps and config.lr_scheduler in (
        "reduce_lr_on_plateau",
        "greedy",
    ):
        return [
            Problem(
                "jagged_restart_steps",
                f"cannot scale lr_scheduler = {config.lr_scheduler!r}: it sets the learning "
                "rate from evaluation results",
                hint="use another lr_scheduler (e.g. cosine), or remove jagged_restart_steps",
            )
        ]
    return []


@hookimpl
def sft_trainer_callbacks(config: Config | None) -> Sequence[Any]:
    if config is None or not keys_of(config).relora:
        return []
    from sft.plugins.relora.restarts import ReloraCallback

    return [ReloraCallback(config)]


@hookimpl
def sft_train_start(config: Config | None, trainer: Any) -> None:
    if config is None:
        return
    keys = keys_of(config)
    if keys.relora and (callback := _callback(trainer)) is not None:
        log = trainer.log

        def log_restarts(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:  # a training record: every logger and metrics.jsonl see it
                logs["num_lora_restarts"] = callback.restarts
            log(logs, *args, **kwargs)

        trainer.log = log_restarts
    if not keys.jagged_restart_steps:
        return
    from sft.plugins.relora.schedule import JaggedRestarts

    build = trainer.create_scheduler

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = build(num_training_steps, optimizer)
        if not isinstance(scheduler, JaggedRestarts):
            trainer.lr_scheduler = JaggedRestarts(
                scheduler,
                trainer.optimizer if optimizer is None else optimizer,
                every=keys.jagged_restart_steps,
                warmup=keys.jagged_restart_warmup_steps or 10,  # Axolotl's `or 10`: 0 is 10
                anneal=int(keys.jagged_restart_anneal_steps or 1),
                floor=_floor(config),
            )
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def _floor(config: Config) -> float:
    """The factor at a restart: Axolotl's `cosine_min_lr_ratio or 0.001`. sft applies
    cosine_min_lr_ratio to the cosine schedule only, so the floor follows it there."""
    from sft.plugins.relora.schedule import JAGGED_FLOOR

    if config.lr_scheduler == "cosine" and config.cosine_min_lr_ratio:
        return float(config.cosine_min_lr_ratio)
    return JAGGED_FLOOR


def _callback(trainer: Any) -> Any:
    """The run's ReLoRA callback, if it has one."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        return None
    from sft.plugins.relora.restarts import ReloraCallback

    for callback in handler.callbacks:
        if isinstance(callback, ReloraCallback):
            return callback
    return None


@hookimpl
def sft_save_checkpoint(config: Config, trainer: Any, checkpoint_dir: str) -> None:
    if (callback := _callback(trainer)) is not None:
        callback.save(trainer.model, checkpoint_dir)


@hookimpl
def sft_resume_checkpoint(config: Config, trainer: Any, checkpoint_dir: str) -> None:
    if (callback := _callback(trainer)) is not None:
        callback.resume(trainer.model, checkpoint_dir)


@hookimpl
def sft_save_model(
    config: Config, model: Any, tokenizer: Any, output_dir: str, trainer: Any
) -> str | None:
    callback = _callback(trainer) if trainer is not None else None
    if callback is None:
        return None
    return callback.save_merged(model, tokenizer, output_dir)
