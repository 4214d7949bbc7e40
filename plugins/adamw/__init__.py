"""AdamW from torch: `adamw_torch` and the single-kernel `adamw_torch_fused`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, Optimizer
from sft.config.schema import Config, key
from sft.errors import Problem


@attrs.frozen
class AdamKeys:
    adam_beta1: float = key(0.9, ge=0.0, doc="AdamW beta1 (first-moment decay), in [0, 1).")
    adam_beta2: float = key(0.999, ge=0.0, doc="AdamW beta2 (second-moment decay), in [0, 1).")
    adam_epsilon: float = key(1e-8, gt=0.0, doc="AdamW epsilon (numerical stability).")


ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")
ADAM_KEYS = tuple(attrs.fields_dict(AdamKeys))  # what the factory reads (`Optimizer.keys`)


def _adamw(fused: bool) -> Callable[[Any, Config], Any]:
    def factory(param_groups: Any, config: Config) -> Any:
        import torch

        keys = config.section(AdamKeys)
        return torch.optim.AdamW(
            param_groups,
            lr=config.learning_rate,
            betas=(keys.adam_beta1, keys.adam_beta2),
            eps=keys.adam_epsilon,
            weight_decay=config.weight_decay,
            fused=True if fused else None,
        )

    return factory


def _check(config: Config) -> Sequence[Problem]:
    keys = config.section(AdamKeys)
    return [
        Problem(name, f"must be < 1, found {value:g}")
        for name, value in (("adam_beta1", keys.adam_beta1), ("adam_beta2", keys.adam_beta2))
        if value >= 1.0
    ]


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(AdamKeys)]


@hookimpl
def sft_register_optimizers(register: Callable[[Optimizer], None]) -> None:
    register(
        Optimizer("adamw_torch", _adamw(fused=False), _check, "torch.optim.AdamW", keys=ADAM_KEYS)
    )
    register(
        Optimizer(
            "adamw_torch_fused",
            _adamw(fused=True),
            _check,
            "torch.optim.AdamW(fused=True): one kernel for all parameters (CPU and CUDA)",
            keys=ADAM_KEYS,
        )
    )
