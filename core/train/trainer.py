"""The HF `Trainer` subclass: our optimizer registry, schedules, and atomic checkpoints.

Only the training path imports this module (`sft.train.run` once the model is loaded, and the
resume callback): it imports transformers' Trainer, which pulls in torch and accelerate.

Loss normalisation: transformers' Trainer counts the trainable tokens of every micro-batch of
an optimizer step (`num_items_in_batch`) and the causal-LM loss divides the summed token losses
by that count, so the update is the mean over trainable tokens of the whole step whatever the
micro-batch / accumulation split (tested). We keep that path intact (no custom loss).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from sft.config.schema import Config
from sft.errors import ModelError, PluginError
from sft.train.output import CHECKPOINT_PREFIX
from sft.train.resume import loading_checkpoint

if TYPE_CHECKING:
    from sft.manager import SftPlugins

LORAPLUS_EMBEDDING_LR = 1e-6  # Axolotl's and peft's default for loraplus_lr_embedding


def parameter_groups(
    model: Any, weight_decay: float, config: Config | None = None
) -> list[dict[str, Any]]:
    """Decay matrices; never biases, norms or other 1-D parameters.

    With LoRA+ (`config.loraplus_lr_ratio`) each group also carries its own `lr`, as peft's
    `create_loraplus_optimizer` sets them: LoRA B matrices learn at learning_rate × ratio, LoRA on
    embedding layers at `loraplus_lr_embedding`, everything else at learning_rate. Schedules
    scale every group's lr by the same factor, so the ratio holds for the whole run.
    """
    ratio = config.loraplus_lr_ratio if config is not None else None
    if not ratio:
        matrices: list[Any] = []
        vectors: list[Any] = []
        for _, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            (matrices if parameter.ndim >= 2 else vectors).append(parameter)
        groups: list[dict[str, Any]] = [{"params": matrices, "weight_decay": weight_decay}]
        if vectors:
            groups.append({"params": vectors, "weight_decay": 0.0})
        return groups
    assert config is not None
    lr = config.learning_rate
    embedding_lr = config.loraplus_lr_embedding or LORAPLUS_EMBEDDING_LR
    buckets: dict[tuple[float, float], list[Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = weight_decay if parameter.ndim >= 2 else 0.0
        if "lora_embedding_A" in name or "lora_embedding_B" in name:
            group_lr = embedding_lr
        elif "lora_B" in name:
            group_lr = lr * ratio
        else:
            group_lr = lr
        buckets.setdefault((group_lr, decay), []).append(parameter)
    # Base-lr matrices first: the Trainer logs the first group's learning rate.
    order = sorted(buckets, key=lambda k: (k[0] != lr, k[1] != weight_decay))
    return [{"params": buckets[k], "weight_decay": k[1], "lr": k[0]} for k in order]


def build_optimizer(spec: Any, model: Any, config: Config) -> Any:
    """The registered optimizer `spec` for the trainable parameters of `model`."""
    groups = parameter_groups(model, config.weight_decay, config)
    if not any(group["params"] for group in groups):
        raise ModelError("no trainable parameter: check adapter / unfrozen_parameters")
    if spec.uses_model:
        return spec.factory(groups, config, model)
    return spec.factory(groups, config)


def warmup_steps(config: Config, total_steps: int) -> int:
    """The warmup in steps: `warmup_steps` (below 1, a fraction of the total) or `warmup_ratio`."""
    if config.warmup_steps is not None:
        if config.warmup_steps < 1:
            return math.ceil(config.warmup_steps * total_steps)
        return int(config.warmup_steps)
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * total_steps)
    return 0


def build_scheduler(config: Config, optimizer: Any, total_steps: int) -> Any:
    """The learning-rate schedule `lr_scheduler` asks for (see `sft.train.schedule`)."""
    from sft.train.schedule import build_schedule

    return build_schedule(config, optimizer, total_steps, warmup_steps(config, total_steps))


def _raise_storage_error(exc: Exception, checkpoint: Path, staging: Path) -> None:
    """A disk that is full (or read-only) while saving a checkpoint: a clear error naming it,
    and the partial checkpoint removed so it does not keep the disk full."""
    from sft.fsutil import storage_failure

    reason = storage_failure(exc)
    if reason is None:
        return
    shutil.rmtree(staging, ignore_errors=True)
    raise ModelError(
        f"cannot write checkpoint {checkpoint}: {reason}\n"
        "  fix: free space on that disk (or lower save_total_limit), or choose an output_dir "
        "with room; the checkpoints already written are complete and resume from the last one"
    ) from exc


def optimizer_mode(optimizer: Any, mode: str) -> None:
    """Put a schedule-free optimizer in "train" or "eval" mode (a no-op for the others). In eval
    mode the model holds the averaged weights that are the result of training."""
    switch = getattr(optimizer, mode, None)
    if callable(switch):
        switch()


class SftTrainer(Trainer):
    """transformers' Trainer with sft's optimizers, schedules, objectives and atomic checkpoints."""

    def __init__(self, *args: Any, sft_config: Config, plugins: SftPlugins, **kwargs: Any) -> None:
        self.sft_config = sft_config
        self.sft_plugins = plugins
        self._staging_dir: str | None = None
        self.sft_pad_id = kwargs["data_collator"].pad_id
        # Set by the run: writes sft's own record (config, data fingerprint) into each
        # staged checkpoint; and what changed since the checkpoint being resumed.
        self.sft_checkpoint_record: Callable[[Path], None] | None = None
        self.sft_resume_changes = ""
        objectives = plugins.objectives()
        name = sft_config.objective
        self.sft_objective = objectives.get(name) if name else None
        self.sft_objective_owner = objectives.owner(name) if name else ""
        super().__init__(*args, **kwargs)

    def compute_loss(
        self,
        model: Any,
        inputs: Any,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.sft_objective is None:
            return super().compute_loss(
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        result = self.sft_objective.compute_loss(model, inputs, self.sft_config, num_items_in_batch)
        loss, outputs = result if isinstance(result, tuple) else (result, None)
        if not (hasattr(loss, "ndim") and loss.ndim == 0 and loss.is_floating_point()):
            raise PluginError(
                f"objective {self.sft_objective.name!r} (plugin {self.sft_objective_owner}) "
                f"returned {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if hasattr(loss, "shape") else "")
                + "; expected a scalar floating-point tensor (or (loss, outputs))",
                plugin=self.sft_objective_owner,
            )
        if return_outputs:
            return loss, outputs if outputs is not None else {"loss": loss}
        return loss

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None:
            target = self.model if model is None else model
            spec = self.sft_plugins.optimizers().get(self.sft_config.optimizer)
            self.optimizer = build_optimizer(spec, target, self.sft_config)
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        result = super().train(*args, **kwargs)
        optimizer_mode(self.optimizer, "eval")  # schedule-free: save the averaged weights
        return result

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(
                self.sft_config, optimizer or self.optimizer, num_training_steps
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # LOMO and layer-wise GaLore/APOLLO step each weight inside backward and free its
        # gradient there: no gradient is left to measure, and a logged 0 would read as
        # "nothing is learning".
        from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.accelerator.has_lomo_optimizer or isinstance(inner, LayerWiseDummyOptimizer):
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _track_num_input_tokens(self, inputs: Any) -> None:
        # Packed rows carry no attention_mask (it would disable the packed-sequence mask):
        # real tokens are all but each row's padded tail.
        if "attention_mask" in inputs or "position_ids" not in inputs:
            return super()._track_num_input_tokens(inputs)
        import torch

        ids = inputs["input_ids"]
        pad = self.sft_pad_id
        is_pad = (ids == pad).flip(-1).to(torch.int64)
        real = torch.as_tensor(ids.numel(), device=ids.device) - is_pad.cumprod(-1).sum()
        # Summed over all processes, like the Trainer's own count.
        self.state.num_input_tokens_seen += int(self.accelerator.gather(real).sum().item())
        return None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        with loading_checkpoint(resume_from_checkpoint, self.sft_resume_changes):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with loading_checkpoint(checkpoint, self.sft_resume_changes):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Write into a staging directory, then rename: a kill mid-save never leaves a
        # `checkpoint-N` that resume would pick up half-written.
        # Every process writes its part (sharded engines) into the same staging directory:
        # it is emptied before anyone writes, and renamed once everyone is done. One run
        # at a time uses an output_dir (`sft.train.output` holds a lock).
        root = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging = root / ".staging"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        optimizer_mode(self.optimizer, "eval")  # schedule-free: checkpoint the averaged weights
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.sft_checkpoint_record is not None:
                self.sft_checkpoint_record(staging / name)
            if self.args.should_save:
                self.sft_plugins.save_checkpoint(self.sft_config, self, str(staging / name))
        except Exception as exc:
            _raise_storage_error(exc, root / name, staging)
            raise
        finally:
            self._staging_dir = None
            optimizer_mode(self.optimizer, "train")
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = root / name
            shutil.rmtree(target, ignore_errors=True)
            (staging / name).replace(target)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint == str(staging / name):
                # The Trainer recorded the staging path (in its state and the checkpoint's
                # trainer_state.json): point both at where the checkpoint is now.
                self.state.best_model_checkpoint = str(target)
                self.state.save_to_json(str(target / "trainer_state.json"))
            rotate_checkpoints(
                output_dir=str(root),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()  # checkpoint-N exists for every process now
