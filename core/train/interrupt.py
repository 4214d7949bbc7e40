"""Ctrl-C and SIGTERM during `sft run`: finish the step, write a checkpoint, stop, say how to resume.

Schedulers preempt a job with SIGTERM (and SIGKILL after a grace period); a user stops one with
Ctrl-C. During training the first signal asks the Trainer to save a checkpoint once the current
optimizer step is done — through its normal, atomic checkpoint path, so resume picks it up — and
to stop. A second signal stops at once. Before training starts (data preparation, model load)
and after it ends there is nothing to save mid-way: a signal stops at once.

Under torchrun every rank gets the signal, maybe at different steps: the ranks agree each step
(one tiny all-reduce) so that all of them save and stop at the same step. Only rank 0 prints.

Only the training path (`sft.train.run`) imports this module.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
from transformers import TrainerCallback

from sft.config.schema import Config
from sft.distributed import is_main_process
from sft.errors import Interrupted

EXIT_CODES: dict[int, int] = {
    signal.SIGINT: 130,
    signal.SIGTERM: 143,
}  # 128 + signal number, as shells report


def _name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


@attrs.define
class StopRequest:
    """Signal handlers for one run, and the signal that asked it to stop (if any)."""

    console: Any = None
    signum: int | None = None
    training: bool = False  # between the Trainer's on_train_begin and on_train_end
    trained: bool = False  # after on_train_end: the final save and what follows
    _previous: dict[int, Any] = attrs.field(factory=dict)
    _pid: int = attrs.field(factory=os.getpid)

    def install(self) -> StopRequest:
        """Handle SIGINT and SIGTERM until `restore()` (only possible in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install()`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _say(self, text: str) -> None:
        if self.console is not None and is_main_process():
            self.console.print(text, markup=False, highlight=False)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A forked data-preparation worker: its parent stops the pool.
            os._exit(EXIT_CODES.get(signum, 1))
        if self.training and self.signum is None:
            self.signum = signum
            again = "Ctrl-C again" if signum == signal.SIGINT else "signal again"
            self._say(
                f"{_name(signum)}: finishing the current step, then saving a checkpoint "
                f"({again} to stop at once, without one)"
            )
            return
        if self.training:
            text = f"{_name(signum)} again: stopped at once, without saving a checkpoint"
        elif self.trained:
            text = (
                f"{_name(signum)}: stopped after training, before the final save finished; "
                "the output directory may be incomplete (a checkpoint-N in it, if any, is whole)"
            )
        else:
            text = f"{_name(signum)}: stopped before training (nothing to save)"
        raise Interrupted(text if is_main_process() else "", EXIT_CODES.get(signum, 130))

    def requested(self, device: Any = None) -> bool:
        """Whether any rank was asked to stop (all ranks must agree, or they hang)."""
        asked = self.signum is not None
        try:
            import torch
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is a dependency
            return asked
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return asked
        flag = torch.tensor([1 if asked else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM  # another rank got it; stop the same way
        return bool(flag.item())

    def stopped(self, config: Config, output_dir: Path, step: int, max_steps: int) -> Interrupted:
        """What `train()` raises after the Trainer saved `checkpoint-<step>` and stopped."""
        assert self.signum is not None
        checkpoint = output_dir / f"checkpoint-{step}"
        if config.auto_resume_from_checkpoints and not config.resume_from_checkpoint:
            how = "run the same command again (auto_resume_from_checkpoints = true)"
        else:
            how = (
                f"run the same command with --set resume_from_checkpoint={checkpoint} "
                "(or --set auto_resume_from_checkpoints=true, or set it in the config)"
            )
        text = (
            f"{_name(self.signum)}: stopped at step {step}/{max_steps}; "
            f"checkpoint written to {checkpoint}\n  to resume: {how}"
        )
        return Interrupted(
            text if is_main_process() else "", EXIT_CODES[self.signum], str(checkpoint)
        )


def make_stop_callback(stop: StopRequest) -> StopOnSignal:
    """The Trainer callback that turns a stop request into 'save now, then stop'.

    Add it after the other callbacks: its `on_step_end` runs last, so a signal that arrives
    while another callback works on this step still stops at this step.
    """
    return StopOnSignal(stop)


class StopOnSignal(TrainerCallback):  # type: ignore[misc]
    """Saves and stops at the end of the step during which a stop was requested."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.saved_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.training = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop.requested(args.device):
            control.should_save = True  # the Trainer saves right after on_step_end
            control.should_training_stop = True
            control.should_evaluate = False  # a preempted job has no time for an eval
            self.saved_at = state.global_step

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.saved_at == state.global_step:  # already saved this step; no epoch eval
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.training = False
        self.stop.trained = True


__all__ = ["EXIT_CODES", "StopOnSignal", "StopRequest", "make_stop_callback"]
