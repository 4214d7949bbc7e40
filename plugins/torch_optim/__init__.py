"""More optimizers from torch and transformers: `sgd`, `adafactor`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, Optimizer
from sft.config.schema import Config, key


@attrs.frozen
class SgdKeys:
    sgd_momentum: float = key(0.0, ge=0.0, le=1.0, doc="SGD momentum.")
    sgd_nesterov: bool = key(False, doc="SGD: Nesterov momentum (needs sgd_momentum > 0).")


def _sgd(param_groups: Any, config: Config) -> Any:
    import torch

    keys = config.section(SgdKeys)
    return torch.optim.SGD(
        param_groups,
        lr=config.learning_rate,
        momentum=keys.sgd_momentum,
        nesterov=keys.sgd_nesterov,
        weight_decay=config.weight_decay,
    )


def _adafactor(param_groups: Any, config: Config) -> Any:
    from transformers.optimization import Adafactor

    # With an explicit learning rate (sft always has one) Adafactor's relative step is off.
    return Adafactor(
        param_groups,
        lr=config.learning_rate,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        weight_decay=config.weight_decay,
    )


def _check_sgd(config: Config) -> Sequence[Any]:
    from sft.errors import Problem

    keys = config.section(SgdKeys)
    if keys.sgd_nesterov and keys.sgd_momentum == 0:
        return [Problem("sgd_nesterov", "Nesterov momentum needs sgd_momentum > 0")]
    return []


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(SgdKeys)]


@hookimpl
def sft_register_optimizers(register: Callable[[Optimizer], None]) -> None:
    register(
        Optimizer(
            "sgd",
            _sgd,
            _check_sgd,
            "torch.optim.SGD (+ momentum, Nesterov)",
            keys=("sgd_momentum", "sgd_nesterov"),
        )
    )
    register(
        Optimizer(
            "adafactor",
            _adafactor,
            None,
            "transformers Adafactor with a fixed learning rate (factored second moments: less memory)",
            keys=(),
        )
    )
