"""The training-health monitor: each REFERENCE.md signal is flagged once, with a fix."""

from __future__ import annotations

import math

from sft.train.monitor import HealthMonitor, format_seconds


def problems(monitor: HealthMonitor) -> list[str]:
    return [w.problem for w in monitor.warnings]


def test_healthy_training_raises_nothing():
    monitor = HealthMonitor(lr_schedule="cosine", warmup=2)
    for step in range(1, 30):
        monitor.check(
            step,
            {"loss": 3.0 - step * 0.05, "grad_norm": 1.0, "learning_rate": 1e-4 * (1 - step / 40)},
        )
    monitor.check(10, {"eval_loss": 2.5})
    assert monitor.warnings == []


def test_nan_loss_zero_and_spiking_grad_norm():
    monitor = HealthMonitor()
    monitor.check(1, {"loss": math.nan, "grad_norm": 0.0})
    monitor.check(2, {"loss": 1.0, "grad_norm": 250.0})
    monitor.check(3, {"loss": 0.001, "grad_norm": 250.0})
    found = " | ".join(problems(monitor))
    assert (
        "loss is nan" in found
        and "grad_norm is 0" in found
        and "> 100" in found
        and "near 0" in found
    )
    assert len(monitor.warnings) == 4  # the repeated spike is reported once


def test_flat_loss_from_step_one():
    monitor = HealthMonitor()
    for step in range(1, 12):
        monitor.check(step, {"loss": 2.0 + 0.001 * step})
    assert any("has not fallen" in p for p in problems(monitor))
    assert "train_on_inputs" in monitor.warnings[0].fix


def test_eval_loss_rising_while_train_falls():
    monitor = HealthMonitor()
    for step, (train, evaluation) in enumerate([(2.0, 1.9), (1.5, 2.0), (1.0, 2.2)], start=1):
        monitor.check(step, {"loss": train})
        monitor.check(step, {"eval_loss": evaluation})
    assert any("eval_loss rising" in p for p in problems(monitor))


def test_flat_or_nan_learning_rate_against_the_schedule():
    monitor = HealthMonitor(lr_schedule="cosine", warmup=0)
    for step in range(1, 10):
        monitor.check(step, {"learning_rate": 1e-4})
    monitor.check(11, {"learning_rate": math.nan})
    found = problems(monitor)
    assert any("stays at" in p for p in found) and any("learning rate is nan" in p for p in found)
    constant = HealthMonitor(lr_schedule="constant")
    for step in range(1, 10):
        constant.check(step, {"learning_rate": 1e-4})
    assert constant.warnings == []


def test_format_seconds():
    assert [format_seconds(s) for s in (5, 75, 3725)] == ["5s", "1m15s", "1h02m"]
