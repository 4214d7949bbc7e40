"""bitsandbytes 8-bit and paged optimizers: less optimizer memory (paged ones need CUDA); under
FSDP2 they update each process's shards (sharded.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sft import hookimpl
from sft.components import Optimizer
from sft.config.schema import Config
from sft.errors import ModelError, Problem

# The AdamW keys of the `adamw` plugin, read here too (see `Optimizer.keys`).
ADAM_KEYS = ("adam_beta1", "adam_beta2", "adam_epsilon")


def _betas(config: Config) -> tuple[float, float]:
    beta1 = getattr(config, "adam_beta1", 0.9)
    beta2 = getattr(config, "adam_beta2", 0.999)
    return beta1, beta2


def _bnb(name: str, paged: bool) -> Callable[[Any, Config], Any]:
    def factory(param_groups: Any, config: Config) -> Any:
        import torch

        if paged and not torch.cuda.is_available():
            raise ModelError(
                f"optimizer {config.optimizer!r} pages optimizer state between GPU and CPU memory "
                "and needs a CUDA GPU\n  fix: use adamw_8bit (or adamw_torch) on CPU"
            )
        try:
            import bitsandbytes.optim as bnb_optim
        except ImportError as exc:
            raise ModelError(
                f"optimizer {config.optimizer!r} needs bitsandbytes\n  fix: pip install bitsandbytes"
            ) from exc
        from sft.plugins.bnb_optim.sharded import on_local_shards

        cls = on_local_shards(getattr(bnb_optim, name))
        kwargs: dict[str, Any] = {
            "lr": config.learning_rate,
            "weight_decay": config.weight_decay,
            "betas": _betas(config),
        }
        if "Lion" not in name:
            kwargs["eps"] = getattr(config, "adam_epsilon", 1e-8)
        return cls(param_groups, **kwargs)

    return factory


def _check_paged(config: Config) -> list[Problem]:
    from sft.hardware import cuda_present

    if cuda_present():
        return []
    return [
        Problem(
            "optimizer",
            f"{config.optimizer} pages optimizer state between GPU and CPU memory: it needs a CUDA GPU, and none is visible here",
            hint="use adamw_8bit or adamw_torch on CPU",
            machine=True,
        )
    ]


@hookimpl
def sft_register_optimizers(register: Callable[[Optimizer], None]) -> None:
    register(
        Optimizer(
            "adamw_8bit",
            _bnb("AdamW8bit", False),
            None,
            "bitsandbytes AdamW with 8-bit state",
            keys=ADAM_KEYS,
        )
    )
    register(
        Optimizer(
            "adamw_bnb_8bit",
            _bnb("AdamW8bit", False),
            None,
            "alias of adamw_8bit (Axolotl name)",
            keys=ADAM_KEYS,
        )
    )
    register(
        Optimizer(
            "paged_adamw_8bit",
            _bnb("PagedAdamW8bit", True),
            _check_paged,
            "8-bit AdamW, state paged to CPU under memory pressure (CUDA)",
            keys=ADAM_KEYS,
        )
    )
    register(
        Optimizer(
            "paged_adamw_32bit",
            _bnb("PagedAdamW32bit", True),
            _check_paged,
            "32-bit AdamW, state paged (CUDA)",
            keys=ADAM_KEYS,
        )
    )
    register(
        Optimizer(
            "lion_8bit",
            _bnb("Lion8bit", False),
            None,
            "bitsandbytes Lion with 8-bit state",
            keys=("adam_beta1", "adam_beta2"),  # Lion has no epsilon
        )
    )
