"""Learning-rate schedules: every transformers `SchedulerType`, and Axolotl's `rex` and
`one_cycle`. Nothing here imports torch until a schedule is built, so `sft validate` can check
the schedule keys.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from sft.config.schema import Config
from sft.errors import ModelError, Problem

# The options each schedule takes from `lr_scheduler_kwargs` (the keyword arguments of its
# transformers or torch function, less those sft sets itself: optimizer, warmup, total steps).
# tests/train/test_schedule.py checks this table against the installed transformers.
SCHEDULE_OPTIONS: dict[str, frozenset[str]] = {
    "linear": frozenset(),
    "cosine": frozenset({"num_cycles"}),
    "cosine_with_restarts": frozenset({"num_cycles"}),
    "polynomial": frozenset({"lr_end", "power"}),
    "constant": frozenset(),
    "constant_with_warmup": frozenset(),
    "inverse_sqrt": frozenset({"timescale"}),
    "reduce_lr_on_plateau": frozenset(
        {"mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps"}
    ),
    "cosine_with_min_lr": frozenset({"num_cycles", "min_lr", "min_lr_rate"}),
    "cosine_warmup_with_min_lr": frozenset(
        {"num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"}
    ),
    "warmup_stable_decay": frozenset(
        {
            "num_decay_steps",
            "num_stable_steps",
            "warmup_type",
            "decay_type",
            "min_lr_ratio",
            "num_cycles",
        }
    ),
    "greedy": frozenset(
        {
            "mode",
            "factor",
            "patience",
            "threshold",
            "threshold_mode",
            "cooldown",
            "warmup",
            "min_lr",
            "max_lr",
            "smooth",
            "window_size",
            "reset_start",
            "eps",
        }
    ),
    "rex": frozenset(),
    "one_cycle": frozenset(
        {
            "pct_start",
            "anneal_strategy",
            "cycle_momentum",
            "base_momentum",
            "max_momentum",
            "div_factor",
            "final_div_factor",
            "three_phase",
        }
    ),
}
# Schedules that step on the eval loss (the Trainer steps them after each evaluation).
ON_EVAL_LOSS = frozenset({"reduce_lr_on_plateau", "greedy"})
SFT_SCHEDULES = frozenset({"rex", "one_cycle"})  # built here; the rest by transformers


def schedule_problems(config: Config) -> list[Problem]:
    """What `sft validate` finds in the schedule keys (no torch import)."""
    name = config.lr_scheduler
    options = dict(config.lr_scheduler_kwargs or {})
    problems = []
    allowed = SCHEDULE_OPTIONS[name]
    for option in sorted(set(options) - allowed):
        problems.append(
            Problem(
                f"lr_scheduler_kwargs.{option}",
                f"is not an option of lr_scheduler {name!r}",
                hint=f"its options: {', '.join(sorted(allowed))}"
                if allowed
                else f"{name} takes no options: remove lr_scheduler_kwargs",
            )
        )
    if config.cosine_constant_lr_ratio and not (name == "cosine" and config.cosine_min_lr_ratio):
        problems.append(
            Problem(
                "cosine_constant_lr_ratio",
                "has no effect: it shapes lr_scheduler = 'cosine' with a cosine_min_lr_ratio "
                f"(here lr_scheduler = {name!r}, cosine_min_lr_ratio = "
                f"{config.cosine_min_lr_ratio!r})",
                hint="set lr_scheduler = 'cosine' and cosine_min_lr_ratio, or remove it",
                warning=True,
            )
        )
    if config.lr_quadratic_warmup and name != "cosine":
        problems.append(
            Problem(
                "lr_quadratic_warmup",
                f"has no effect with lr_scheduler = {name!r}: it shapes the warmup of 'cosine' "
                "(as in Axolotl)",
                hint="set lr_scheduler = 'cosine', or remove lr_quadratic_warmup",
                warning=True,
            )
        )
    if config.lr_quadratic_warmup and name == "cosine" and "num_cycles" in options:
        problems.append(
            Problem(
                "lr_quadratic_warmup",
                "conflicts with lr_scheduler_kwargs.num_cycles: its cosine is a single half wave",
                hint="remove one of them",
            )
        )
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        floors = [k for k in ("min_lr", "min_lr_rate") if k in options]
        if len(floors) > 1:
            problems.append(
                Problem("lr_scheduler_kwargs.min_lr_rate", "conflicts with min_lr: set one floor")
            )
        elif floors and config.cosine_min_lr_ratio is not None:
            problems.append(
                Problem(
                    "cosine_min_lr_ratio",
                    f"conflicts with lr_scheduler_kwargs.{floors[0]}: set one floor",
                )
            )
        elif not floors and config.cosine_min_lr_ratio is None:
            problems.append(
                Problem(
                    "lr_scheduler",
                    f"{name} needs its floor",
                    hint="set cosine_min_lr_ratio (e.g. 0.1), or lr_scheduler_kwargs.min_lr",
                )
            )
    if name == "warmup_stable_decay" and "num_decay_steps" not in options:
        problems.append(
            Problem(
                "lr_scheduler_kwargs",
                "warmup_stable_decay needs num_decay_steps (the steps of the final decay)",
                hint="e.g. lr_scheduler_kwargs = {num_decay_steps = 100}",
            )
        )
    if name in ON_EVAL_LOSS and not (config.val_set_size or config.test_datasets):
        problems.append(
            Problem(
                "lr_scheduler",
                f"{name} lowers the learning rate when the eval loss stops falling: it needs "
                "an eval set",
                hint="set val_set_size (e.g. 0.05) or test_datasets",
            )
        )
    if config.lr_div_factor is not None:
        if name != "one_cycle":
            problems.append(
                Problem("lr_div_factor", f"applies to lr_scheduler = 'one_cycle', not {name!r}")
            )
        elif "div_factor" in options:
            problems.append(
                Problem("lr_div_factor", "conflicts with lr_scheduler_kwargs.div_factor: set one")
            )
    return problems


def _schedule_kwargs(config: Config) -> dict[str, Any]:
    options = dict(config.lr_scheduler_kwargs or {})
    name = config.lr_scheduler
    floor_given = "min_lr" in options or "min_lr_rate" in options
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and not floor_given:
        options["min_lr_rate"] = config.cosine_min_lr_ratio
    return options


def rex_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """REX (Chen et al. 2022, as Axolotl has it): linear warmup to 1, then
    `floor + (1 - floor) * z / (0.1 + 0.9 z)` with z the fraction of the decay still to go."""
    if step < warmup:
        return step / max(1, warmup)
    remaining = max(1, total - warmup)
    z = max(0.0, 1.0 - (step - warmup) / remaining)
    return floor + (1.0 - floor) * z / (0.1 + 0.9 * z)


def cosine_constant_factor(
    step: int,
    *,
    warmup: int,
    total: int,
    floor: float,
    constant_ratio: float = 1.0,
    quadratic_warmup: bool = False,
) -> float:
    """Axolotl's cosines: warmup (linear, or along (step / warmup)² with lr_quadratic_warmup),
    cosine from 1 down to `floor` at step `total * constant_ratio`, then `floor`."""
    if step < warmup:
        ramp = step / max(1, warmup)
        return ramp * ramp if quadratic_warmup else ramp
    end = int(total * constant_ratio)
    progress = (min(step, end) - warmup) / max(1, end - warmup)
    return max(0.0, (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))) + floor


def _one_cycle(config: Config, optimizer: Any, total: int, warmup: int) -> Any:
    from torch.optim.lr_scheduler import OneCycleLR

    options = dict(config.lr_scheduler_kwargs or {})
    options.setdefault("pct_start", warmup / total if warmup else 0.3)
    options.setdefault("anneal_strategy", "cos")
    if config.lr_div_factor is not None:
        options["div_factor"] = config.lr_div_factor
    defaults = getattr(optimizer, "defaults", {})
    if "momentum" not in defaults and "betas" not in defaults:
        options.setdefault("cycle_momentum", False)  # nothing to cycle
    # Each group's own peak (LoRA+ groups keep their ratio).
    peaks = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=max(total, 1), **options)


def build_schedule(config: Config, optimizer: Any, total: int, warmup: int) -> Any:
    """The schedule for `total` optimizer steps, `warmup` of them warming up."""
    name = config.lr_scheduler
    try:
        if name == "rex":
            from torch.optim.lr_scheduler import LambdaLR

            factor = functools.partial(
                rex_factor, warmup=warmup, total=total, floor=config.cosine_min_lr_ratio or 0.0
            )
            return LambdaLR(optimizer, factor)
        if name == "one_cycle":
            return _one_cycle(config, optimizer, total, warmup)
        constant = bool(config.cosine_min_lr_ratio and config.cosine_constant_lr_ratio)
        if name == "cosine" and (constant or config.lr_quadratic_warmup):
            from torch.optim.lr_scheduler import LambdaLR

            factor = functools.partial(
                cosine_constant_factor,
                warmup=warmup,
                total=total,
                floor=config.cosine_min_lr_ratio or 0.0,
                constant_ratio=config.cosine_constant_lr_ratio if constant else 1.0,
                quadratic_warmup=config.lr_quadratic_warmup,
            )
            return LambdaLR(optimizer, factor)
        from transformers import get_scheduler

        if name == "cosine" and config.cosine_min_lr_ratio is not None:
            name, options = "cosine_with_min_lr", {"min_lr_rate": config.cosine_min_lr_ratio}
            options.update(config.lr_scheduler_kwargs or {})
        else:
            options = _schedule_kwargs(config)
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total,
            scheduler_specific_kwargs=options,
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"cannot build lr_scheduler {config.lr_scheduler!r} with lr_scheduler_kwargs "
            f"{config.lr_scheduler_kwargs or {}}: {exc}\n"
            "  fix: check the option values in docs/training.md (Schedules)"
        ) from exc


__all__ = [
    "SCHEDULE_OPTIONS",
    "build_schedule",
    "cosine_constant_factor",
    "rex_factor",
    "schedule_problems",
]
