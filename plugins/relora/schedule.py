"""Jagged learning-rate restarts: the run's schedule times a factor that restarts."""

from __future__ import annotations

from typing import Any

JAGGED_FLOOR = 0.001  # the factor at a restart (Axolotl's default floor)


def jagged_factor(
    step: int, every: int, warmup: int, anneal: int, floor: float = JAGGED_FLOOR
) -> float:
    """Axolotl's factor for the optimizer step `step` (0-based): 1 until the first restart
    nears; then `floor` at each restart, rising linearly over `warmup` steps, and falling over the
    last `anneal` steps before the next restart."""
    if step < every - anneal:
        return 1.0
    progress = step % every
    if progress < warmup:
        ramp = min(1.0, progress / warmup)
    elif progress > every - anneal:
        ramp = min(1.0, (every - progress) / anneal)
    else:
        ramp = 1.0
    return ramp * (1 - floor) + floor


class JaggedRestarts:
    """A learning-rate scheduler wrapping another: its learning rates times `jagged_factor`.

    The wrapped scheduler steps on its own learning rates (restored before each step, so a
    scheduler that computes the next rate from the current one is not disturbed); the optimizer
    trains with the scaled ones. State dicts are the wrapped scheduler's: the factor follows
    from its step.
    """

    def __init__(
        self,
        inner: Any,
        optimizer: Any,
        every: int,
        warmup: int,
        anneal: int,
        floor: float = JAGGED_FLOOR,
    ) -> None:
        self.inner, self.optimizer = inner, optimizer
        self.every, self.warmup, self.anneal, self.floor = every, warmup, anneal, floor
        self._apply()

    @property
    def last_epoch(self) -> int:
        return int(self.inner.last_epoch)

    def factor(self) -> float:
        return jagged_factor(self.last_epoch, self.every, self.warmup, self.anneal, self.floor)

    def _apply(self) -> None:
        factor = self.factor()
        self._last_lr = [lr * factor for lr in self.inner.get_last_lr()]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def step(self, *args: Any, **kwargs: Any) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr(), strict=True):
            group["lr"] = lr
        self.inner.step(*args, **kwargs)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.inner.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._apply()
