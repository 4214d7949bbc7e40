"""What the user sees during training: a live view (or one line per log), metrics JSONL, and a
training-health monitor with the thresholds of the SFT reference.

Only the training path imports this module (`sft.train.run`, once the model is loaded): its
callbacks subclass transformers' `TrainerCallback`, which pulls in torch and accelerate.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import attrs
from transformers import TrainerCallback

from sft.errors import ModelError
from sft.train.output import latest_checkpoint

GRAD_NORM_SPIKE = 100.0
LOSS_NEAR_ZERO = 0.01
FLAT_WINDOW = 10  # logged steps compared for "flat or rising from step 1"


@attrs.define
class HealthWarning:
    step: int
    problem: str
    fix: str

    def render(self) -> str:
        return f"step {self.step}: {self.problem} — {self.fix}"


@attrs.define
class HealthMonitor:
    """Checks each log against the healthy-training signals; each problem is reported once."""

    lr_schedule: str = "cosine"
    warmup: int = 0
    losses: list[float] = attrs.field(factory=list)
    eval_losses: list[tuple[int, float, float]] = attrs.field(factory=list)
    lrs: list[float] = attrs.field(factory=list)
    warnings: list[HealthWarning] = attrs.field(factory=list)
    _seen: set[str] = attrs.field(factory=set)

    def _warn(self, key: str, step: int, problem: str, fix: str) -> HealthWarning | None:
        if key in self._seen:
            return None
        self._seen.add(key)
        warning = HealthWarning(step, problem, fix)
        self.warnings.append(warning)
        return warning

    def check(self, step: int, logs: dict[str, float]) -> list[HealthWarning]:
        found: list[HealthWarning | None] = []
        loss = logs.get("loss")
        if loss is not None:
            if not math.isfinite(loss):
                found.append(
                    self._warn(
                        "nan",
                        step,
                        f"loss is {loss}",
                        "lower learning_rate, use bf16 = 'auto', check the data for empty samples",
                    )
                )
            else:
                self.losses.append(loss)
                if loss < LOSS_NEAR_ZERO:
                    found.append(
                        self._warn(
                            "zero",
                            step,
                            f"loss {loss:.4f} is near 0 (memorising?)",
                            "fewer epochs or more data; check that labels are not the inputs",
                        )
                    )
                if len(self.losses) == FLAT_WINDOW:
                    first, last = self.losses[0], sum(self.losses[-3:]) / 3
                    if last >= first * 0.99:
                        found.append(
                            self._warn(
                                "flat",
                                step,
                                f"loss has not fallen since step 1 ({first:.3f} → {last:.3f})",
                                "check train_on_inputs and the dataset (`sft preprocess --debug`), try a higher learning_rate",
                            )
                        )
        grad_norm = logs.get("grad_norm")
        if grad_norm is not None:
            if not math.isfinite(grad_norm):
                found.append(
                    self._warn(
                        "grad_nan",
                        step,
                        f"grad_norm is {grad_norm}",
                        "lower learning_rate; check the data",
                    )
                )
            elif grad_norm == 0.0:
                found.append(
                    self._warn(
                        "grad_zero",
                        step,
                        "grad_norm is 0: nothing is learning",
                        "check that parameters are trainable (adapter / unfrozen_parameters) and labels are not all -100",
                    )
                )
            elif grad_norm > GRAD_NORM_SPIKE:
                found.append(
                    self._warn(
                        "grad_spike",
                        step,
                        f"grad_norm {grad_norm:.1f} > {GRAD_NORM_SPIKE:g}: unstable",
                        "lower learning_rate, keep max_grad_norm = 1.0, add warmup",
                    )
                )
        lr = logs.get("learning_rate")
        if lr is not None:
            if not math.isfinite(lr):
                found.append(
                    self._warn(
                        "lr_nan",
                        step,
                        f"learning rate is {lr}",
                        "check learning_rate and the schedule keys",
                    )
                )
            else:
                self.lrs.append(lr)
                if (
                    self.lr_schedule != "constant"
                    and step > self.warmup + 2
                    and len(self.lrs) >= 5
                    and len(set(self.lrs[-5:])) == 1
                    and self.lrs[-1] > 0
                    and self.lr_schedule in ("cosine", "linear")
                ):
                    found.append(
                        self._warn(
                            "lr_flat",
                            step,
                            f"learning rate stays at {lr:.2e} under a {self.lr_schedule} schedule",
                            "check lr_scheduler, warmup and max_steps",
                        )
                    )
        eval_loss = logs.get("eval_loss")
        if eval_loss is not None:
            train_loss = self.losses[-1] if self.losses else math.nan
            self.eval_losses.append((step, eval_loss, train_loss))
            if len(self.eval_losses) >= 3:
                (_, e0, t0), (_, e1, _), (_, e2, t2) = self.eval_losses[-3:]
                if e2 > e1 > e0 and t2 < t0:
                    found.append(
                        self._warn(
                            "overfit",
                            step,
                            f"eval_loss rising ({e0:.3f} → {e2:.3f}) while train loss falls",
                            "overfitting: fewer epochs, more data, or more lora_dropout / weight_decay",
                        )
                    )
        return [w for w in found if w is not None]


class LossDiverged(ModelError):
    """The loss watchdog stopped the run."""

    title = "training stopped"


@attrs.define
class LossWatchdog:
    """Axolotl's loss watchdog: stop training once the logged loss has been above `threshold`
    for `patience` logs in a row (a NaN or infinite loss counts as above).

    It sees every process's logs (they hold the loss averaged over all processes), so every
    rank stops at the same step. The stop saves no checkpoint: the state has diverged.
    """

    threshold: float
    patience: int = 3
    above: list[tuple[int, float]] = attrs.field(factory=list)
    tripped_at: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> LossWatchdog | None:
        if config.loss_watchdog_threshold is None:
            return None
        return cls(config.loss_watchdog_threshold, config.loss_watchdog_patience or 3)

    def observe(self, step: int, loss: float) -> bool:
        """Record one logged loss; True once the run must stop."""
        if math.isfinite(loss) and loss <= self.threshold:
            self.above.clear()
        else:
            self.above.append((step, loss))
        if self.tripped_at is None and len(self.above) >= self.patience:
            self.tripped_at = step
        return self.tripped_at is not None

    def stopped(self, output_dir: Path, max_steps: int) -> LossDiverged:
        """The error that ends the run, saying what happened and what is kept."""
        losses = ", ".join(
            f"step {step}: {loss:.4g}" for step, loss in self.above[-self.patience :]
        )
        kept = latest_checkpoint(output_dir)
        keeps = (
            f"; the newest checkpoint is {kept} (from before the stop)"
            if kept
            else "; no checkpoint was written before it"
        )
        return LossDiverged(
            f"the loss stayed above loss_watchdog_threshold = {self.threshold:g} for "
            f"{self.patience} logged steps in a row ({losses}): stopped at step "
            f"{self.tripped_at}/{max_steps} without saving the diverged model{keeps}\n"
            "  fix: lower learning_rate, add warmup (warmup_steps), keep max_grad_norm = 1.0 "
            "and check the data (`sft preprocess --debug`); or raise loss_watchdog_threshold"
        )

    def callback(self) -> LossWatchdogCallback:
        return LossWatchdogCallback(self)


class LossWatchdogCallback(TrainerCallback):
    """Feeds each logged loss to the watchdog; stops training (without a checkpoint) once it trips."""

    def __init__(self, watchdog: LossWatchdog) -> None:
        self.watchdog = watchdog

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        loss = (logs or {}).get("loss")
        if loss is not None and self.watchdog.observe(state.global_step, float(loss)):
            control.should_training_stop = True
            control.should_save = False  # a diverged state is no checkpoint to keep
        return control


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class SftProgress(TrainerCallback):
    """Metrics JSONL (always), live view on a terminal or one line per log, health warnings."""

    def __init__(self, output_dir: Path, console: Any, monitor: HealthMonitor) -> None:
        self.output_dir = output_dir
        self.console = console
        self.monitor = monitor
        self.metrics_path = output_dir / "metrics.jsonl"
        self.start = time.time()
        self.last_time = self.start
        self.last_tokens = 0
        self.live: Any = None
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = self.last_time = time.time()
        self.last_tokens = state.num_input_tokens_seen or 0
        if not state.is_world_process_zero:
            return  # one process writes the metrics and shows the progress
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return  # the logged values are already gathered over all processes
        now = time.time()
        tokens = state.num_input_tokens_seen or 0
        record: dict[str, Any] = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            **logs,
        }
        if "loss" in logs:
            elapsed = max(now - self.last_time, 1e-9)
            record["tokens_per_second"] = round((tokens - self.last_tokens) / elapsed, 1)
            self.last_time, self.last_tokens = now, tokens
        record["time"] = round(now - self.start, 2)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.history.append(record)
        for warning in self.monitor.check(state.global_step, logs):
            self._print(f"[yellow]warning[/] {warning.render()}")
        if "loss" in logs or "eval_loss" in logs:
            self._show(record, state)

    def _show(self, record: dict[str, Any], state: Any) -> None:
        done, total = state.global_step, state.max_steps or 1
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (total - done)
        parts = [f"step {done}/{total}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "eval_loss" in record:
            parts.append(f"eval_loss {record['eval_loss']:.4f}")
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.2e}")
        if "grad_norm" in record:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        if "tokens_per_second" in record:
            parts.append(f"{record['tokens_per_second']:.0f} tok/s")
        parts.append(f"eta {format_seconds(eta)}")
        line = " | ".join(parts)
        if self.live is not None:
            from rich.progress_bar import ProgressBar
            from rich.table import Table

            table = Table.grid(padding=(0, 1))
            table.add_row(ProgressBar(total=total, completed=done, width=30), line)
            self.live.update(table)
            if "eval_loss" in record:
                self.console.print(line)
        else:
            self.console.print(line, highlight=False)

    def _print(self, text: str) -> None:
        self.console.print(text)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.live is not None:
            self.live.stop()
            if self.history:
                last = next((r for r in reversed(self.history) if "loss" in r), None)
                if last:
                    self._show(last, state)


def write_plot(history: list[dict[str, Any]], path: Path) -> bool:
    """A loss / learning-rate plot (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    lrs = [(r["step"], r["learning_rate"]) for r in history if "learning_rate" in r]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if train:
        loss_axis.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        loss_axis.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    if lrs:
        lr_axis.plot(*zip(*lrs, strict=True), color="tab:orange")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
