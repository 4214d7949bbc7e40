"""`sft run`: prepare data → load model → adapter → train → save. Read top to bottom."""

from __future__ import annotations

import contextlib
import io
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sft.config.schema import Config
from sft.data.packing import pack_prepared
from sft.distributed import (
    is_local_main_process,
    is_main_process,
    selected_backends,
    world_size,
)
from sft.errors import DataError, ModelError
from sft.train.interrupt import StopRequest, make_stop_callback
from sft.train.output import claim_output_dir, latest_checkpoint, release_output_dir
from sft.train.quiet import quiet_libraries
from sft.train.resume import (
    check_resume,
    data_fingerprint,
    make_apply_callback,
    resume_point,
    write_checkpoint_record,
)

if TYPE_CHECKING:
    from sft.manager import SftPlugins


@attrs.frozen
class RunResult:
    output_dir: Path
    saved: str
    global_step: int
    train_loss: float | None
    metrics: dict[str, Any]
    warnings: list[str]
    resumed_from: str | None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(samples: int, config: Config) -> int:
    """Optimizer steps per epoch as the Trainer counts them: each process gets every
    `world_size`-th micro-batch; a last, partial accumulation still makes a step."""
    batches = math.ceil(math.ceil(samples / config.micro_batch_size) / world_size())
    return max(1, math.ceil(batches / config.gradient_accumulation_steps))


def check_data_fills_a_step(samples: int, config: Config) -> None:
    """Every process needs data of its own: fewer training samples (or packed rows) than
    processes would have the data loader repeat samples to feed them. Say so before training."""
    if samples < world_size():
        raise DataError(
            f"{samples} training sample{'s' if samples != 1 else ''} for {world_size()} "
            "processes: each process needs at least one",
            hint="add data, or run fewer processes",
        )


def _schedule(
    kind: str, every: int | None, per_epoch_count: int | None, per_epoch: int
) -> dict[str, Any]:
    """Trainer settings for evals or saves: every N steps, K times an epoch, or each epoch."""
    if every:
        return {f"{kind}_strategy": "steps", f"{kind}_steps": every}
    if per_epoch_count:
        return {f"{kind}_strategy": "steps", f"{kind}_steps": max(1, per_epoch // per_epoch_count)}
    return {f"{kind}_strategy": "epoch"}


def training_arguments(
    config: Config,
    train_samples: int,
    has_eval: bool,
    dtype: Any,
    engine: dict[str, Any] | None = None,
) -> Any:
    """The Trainer's arguments; `engine` holds those of the selected distributed backend."""
    import torch
    from transformers import TrainingArguments

    per_epoch = steps_per_epoch(train_samples, config)
    eval_kwargs = (
        _schedule("eval", config.eval_steps, config.evals_per_epoch, per_epoch)
        if has_eval
        else {"eval_strategy": "no"}
    )  # eval_strategy = 'epoch' / 'steps' agree with this: checked with the config
    if config.checkpoint_strategy in ("epoch", "best", "no"):
        save_kwargs: dict[str, Any] = {"save_strategy": config.checkpoint_strategy}
    elif config.checkpoint_strategy == "steps" and not (
        config.save_steps or config.saves_per_epoch
    ):
        save_kwargs = {"save_strategy": "steps", "save_steps": 500}  # transformers' default
    else:
        save_kwargs = _schedule("save", config.save_steps, config.saves_per_epoch, per_epoch)
    best = has_eval and (config.load_best_model_at_end or config.early_stopping_patience)
    ranks = best or config.checkpoint_strategy == "best"  # a metric picks checkpoints
    if (
        best
        and save_kwargs["save_strategy"] != "best"  # saved at evaluations by construction
        and save_kwargs.get("save_strategy") != eval_kwargs.get("eval_strategy")
    ):
        raise ModelError(
            "load_best_model_at_end / early_stopping_patience pick the best of the checkpoints "
            f"saved at evaluations, but evaluations run by {eval_kwargs['eval_strategy']} and "
            f"checkpoints by {save_kwargs['save_strategy']}\n  fix: give both the same "
            "schedule, e.g. eval_steps = save_steps (or evals_per_epoch = saves_per_epoch)"
        )
    if (
        best
        and "save_steps" in save_kwargs
        and save_kwargs["save_steps"] % eval_kwargs["eval_steps"]
    ):
        raise ModelError(
            f"checkpoints every {save_kwargs['save_steps']} steps are not saved at evaluations "
            f"(every {eval_kwargs['eval_steps']} steps), which load_best_model_at_end / "
            "early_stopping_patience choose among\n  fix: make the save interval a multiple of "
            "the eval interval"
        )
    from sft.data.streaming import dataloader_settings
    from sft.train.options import trainer_arguments
    from sft.train.tracking import report_to, run_name

    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16 and not config.float16,  # float16: no AMP, no scaler
        tf32=config.tf32 or None,
        report_to=report_to(config),
        run_name=run_name(config),
        remove_unused_columns=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_drop_last=config.dataloader_drop_last,
        train_sampling_strategy=_sampling_strategy(config),
        # Every parameter that trains gets a gradient each step (adapters and full models
        # alike): DDP need not search the graph for unused ones, unless the user says so.
        ddp_find_unused_parameters=bool(config.ddp_find_unused_parameters),
        ddp_backend="gloo" if world_size() > 1 and not torch.cuda.is_available() else None,
        # NEFTune, torch.compile, ... (sft.train.options); the engine's own settings win (an
        # engine whose checkpoints can hold the model only sets save_only_model)
        **{k: v for k, v in trainer_arguments(config).items() if k not in (engine or {})},
        load_best_model_at_end=bool(best),
        metric_for_best_model=(config.metric_for_best_model or "loss") if ranks else None,
        greater_is_better=config.greater_is_better if ranks else None,
        **eval_kwargs,
        **save_kwargs,
        **(engine or {}),
        **dataloader_settings(config),  # streaming: each process its own batches
    )


# a CPU half-precision matmul this many times slower than float32 gets a warning
SLOW_HALF_MATMUL = 2.0


def _slow_half_setting(config: Config, dtype: Any) -> tuple[Any, str] | None:
    """The half-precision dtype this run's matmuls compute in and the fix that makes them
    float32, or None (float32 matmuls)."""
    import torch

    if dtype == torch.float16:
        return dtype, "float16 = false"
    if dtype == torch.bfloat16:
        return dtype, f"{'bfloat16' if config.bfloat16 is True else 'bf16'} = false"
    compute = config.bnb_4bit_compute_dtype if config.load_in_4bit else None
    if compute in ("bfloat16", "float16"):
        return getattr(torch, compute), 'bnb_4bit_compute_dtype = "float32"'
    return None


def _warn_slow_cpu_half(config: Config, dtype: Any, console: Any) -> None:
    """Matmuls in bf16 or fp16 on a CPU where they are slower than in float32 (no AMX or AVX-512
    BF16/FP16: 50-600x for torch's on an AVX2 CPU, ~4x for bitsandbytes' 4-bit layers), measured
    on this machine rather than guessed from its flags."""
    import torch

    from sft.hardware import cpu_matmul_slowdown

    setting = _slow_half_setting(config, dtype)
    if setting is None or torch.cuda.is_available():
        return
    half, fix = setting
    slowdown = cpu_matmul_slowdown(half)
    if slowdown >= SLOW_HALF_MATMUL:
        name = str(half).removeprefix("torch.")
        console.print("warning: ", style="yellow", end="")
        console.print(
            f"on this CPU a {name} matmul takes {slowdown:.0f}x as long as a float32 one (no "
            f"native {name} matmul unit, such as AMX), so this run computing its matmuls in "
            f"{name} will be slower than in float32\n  fix: {fix} (float32 matmuls)",
            markup=False,
            highlight=False,
        )


def _suggest_cpu_bf16(config: Config, dtype: Any, console: Any) -> None:
    """fp32 on a CPU with native bf16 matmuls, bf16 left to `auto`: say what bf16 = true gives
    (bench/train_vs_trl.py on AMX: ~1.5x the tokens/s at ~0.7x the memory, for the LoRA job)."""
    import torch

    from sft.hardware import cpu_bf16_unit

    if dtype != torch.float32 or config.bf16 != "auto" or torch.cuda.is_available():
        return
    unit = cpu_bf16_unit()
    if unit is not None:
        console.print(
            f"note: this CPU has {unit} bf16 matmuls; bf16 = true trains faster and in less "
            "memory (docs/benchmarks.md), at bf16 precision"
        )


def _sampling_strategy(config: Config) -> str:
    """The order transformers' Trainer draws the (prepared, maybe packed) training rows in."""
    if config.curriculum_sampling:
        return "sequential"
    if config.group_by_length and not (config.sample_packing or config.streaming):
        return "group_by_length"
    return "random"


def _early_stopping(config: Config, has_eval: bool) -> list[Any]:
    if not (config.early_stopping_patience and has_eval):
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)]


@contextlib.contextmanager
def _final_save(output_dir: Path) -> Iterator[None]:
    """A full (or read-only) disk while saving the trained model: say so, and what is kept."""
    try:
        yield
    except Exception as exc:
        from sft.fsutil import storage_failure

        reason = storage_failure(exc)
        if reason is None:
            raise
        kept = latest_checkpoint(output_dir)
        resume = (
            f"; {kept} is complete: run the same command with "
            "auto_resume_from_checkpoints = true to save from it"
            if kept
            else ""
        )
        raise ModelError(
            f"cannot write the trained model to {output_dir}: {reason}\n"
            f"  fix: free space on that disk{resume}"
        ) from exc


def prepare_once(config: Config, tokenizer: Any, plugins: SftPlugins, console: Any) -> Any:
    """Prepare the data in one process per node; the others wait for its cache and load it.

    The others wait on the cache entry itself (its `complete` file), never inside a collective:
    tokenising a large dataset takes longer than a process group's timeout. Without
    `dataset_prepared_path`, a multi-process run caches in `output_dir/.sft-prepared`.
    """
    from sft.data.pipeline import prepare_datasets

    if world_size() == 1:
        return prepare_datasets(config, tokenizer, plugins)
    if not config.dataset_prepared_path:
        cache = str(Path(config.output_dir) / ".sft-prepared")
        config = attrs.evolve(config, dataset_prepared_path=cache)
    if is_local_main_process():
        return prepare_datasets(config, tokenizer, plugins)
    told: list[bool] = []

    def wait(cache_dir: Path) -> None:
        if not told:
            told.append(True)
            console.print(f"waiting for local rank 0 to prepare the data into {cache_dir}")
        time.sleep(0.5)

    return prepare_datasets(config, tokenizer, plugins, show_progress=False, wait_for_cache=wait)


def train(config: Config, plugins: SftPlugins | None = None, console: Any = None) -> RunResult:
    """Fine-tune as the config says; return where the result was written and how it went.

    Ctrl-C or SIGTERM during training saves a checkpoint, then raises `sft.errors.Interrupted`
    saying how to resume (`sft.train.interrupt`); the earlier signal handlers are restored.
    """
    from rich.console import Console

    if console is None:
        console = Console(highlight=False)
    if not is_main_process():  # one process prints (errors are still raised on every rank)
        console = Console(file=io.StringIO())
    from sft.train.tracking import tracking

    stop = StopRequest(console).install()
    try:
        with tracking(config):  # the trackers' environment, for this run only
            return _train(config, plugins, console, stop)
    finally:
        stop.restore()
        release_output_dir(Path(config.output_dir))


def _train(config: Config, plugins: SftPlugins, console: Any, stop: StopRequest) -> RunResult:
    if plugins is None:
        plugins = config.plugin_set
    from sft.data.collate import Collator, pad_id_of
    from sft.model import apply_adapter, check_hardware, count_parameters, load_model, resolve_dtype
    from sft.save import write_model_card, write_resolved_config
    from sft.tokenizer import load_tokenizer

    check_hardware(config)  # before anything slow
    quiet_libraries()
    output_dir = Path(config.output_dir)

    def say(text: str) -> None:
        if is_main_process():
            console.print(text, markup=False, highlight=False)

    for warning in config.warnings:  # keys that change nothing (`sft validate` shows them too)
        console.print("warning: ", style="yellow", end="")
        console.print(warning.render(), markup=False, highlight=False)
    resumed_from = resume_point(config, say)
    claimed = claim_output_dir(config, resuming=resumed_from is not None)
    from sft.train.hub import HubPush
    from sft.train.tracking import pushing

    hub = HubPush(config, say) if pushing(config) and is_main_process() else None
    if hub is not None:
        hub.create_repo()  # before anything slow: a wrong repo or token stops the run here
    seed_everything(config.seed)

    tokenizer = load_tokenizer(config, plugins)
    if config.streaming:  # read while training; only test_datasets are prepared
        from sft.data.streaming import prepare_streaming

        prepared = prepare_streaming(
            config, tokenizer, plugins, lambda c: prepare_once(c, tokenizer, plugins, console)
        )
    else:
        prepared = prepare_once(config, tokenizer, plugins, console)
    summary = prepared.summary
    console.print(
        f"data: {'streaming' if config.streaming else summary.train_samples} train / "
        f"{summary.eval_samples} eval samples" + (" (from cache)" if prepared.from_cache else "")
    )
    for line in summary.dropped_lines():  # never drop rows silently
        console.print(f"  {line}", markup=False, soft_wrap=True)  # paths unbroken in logs
    if config.streaming:
        fingerprint = prepared.train.fingerprint() + data_fingerprint(prepared.eval)
    else:
        fingerprint = data_fingerprint(prepared.train, prepared.eval)
    # Before the model loads: refuse a resume that cannot work or would silently change the run.
    plan = check_resume(resumed_from, config, fingerprint, plugins, say) if resumed_from else None

    dtype = resolve_dtype(config)
    model = load_model(config, tokenizer, plugins)
    model = apply_adapter(model, config)
    trainable, total = count_parameters(model)
    console.print(
        f"model: {config.base_model} ({dtype}), trainable {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
    )

    _suggest_cpu_bf16(config, dtype, console)
    _warn_slow_cpu_half(config, dtype, console)
    train_data, eval_data = pack_prepared(config, prepared, plugins, console)
    if config.streaming:  # no length: the Trainer's arguments as for exactly max_steps
        from sft.data.streaming import run_samples

        samples = run_samples(config)
    else:
        samples = len(train_data)
        check_data_fills_a_step(samples, config)
    engine = {}
    for backend in selected_backends(config, plugins):  # validation allows at most one
        engine = backend.training_args(config, model)
        console.print(f"engine: {backend.name}, {world_size()} processes")
    args = training_arguments(config, samples, eval_data is not None, dtype, engine)
    per_epoch = steps_per_epoch(samples, config)
    total_steps = config.max_steps or math.ceil(per_epoch * config.num_epochs)
    processes = f", {world_size()} processes" if world_size() > 1 else ""
    per = "streaming" if config.streaming else f"{per_epoch} per epoch"
    console.print(f"steps: {total_steps} ({per}{processes})")
    # Imported here: these modules import transformers' Trainer (accelerate, peft), which
    # would slow the checks before the model loads and print notices quiet_libraries hides.
    from sft.train.monitor import HealthMonitor, LossWatchdog, SftProgress, write_plot
    from sft.train.trainer import SftTrainer, warmup_steps

    monitor = HealthMonitor(
        lr_schedule=config.lr_scheduler, warmup=warmup_steps(config, total_steps)
    )
    progress = SftProgress(output_dir, console, monitor)
    watchdog = LossWatchdog.from_config(config)
    trainer = SftTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=Collator(
            pad_id_of(tokenizer), config.sequence_len if config.pad_to_sequence_len else None
        ),
        processing_class=tokenizer,
        callbacks=[
            progress,
            *plugins.trainer_callbacks(config),
            *([make_apply_callback(plan, config, plugins, console)] if plan else []),
            *([watchdog.callback()] if watchdog else []),
            *_early_stopping(config, eval_data is not None),
            *([hub.callback()] if hub is not None and config.hub_strategy != "end" else []),
            make_stop_callback(stop),  # last: a signal during another callback stops this step
        ],
        sft_config=config,
        plugins=plugins,
    )
    trainer.sft_checkpoint_record = lambda staged: write_checkpoint_record(
        staged, config, fingerprint
    )
    trainer.sft_resume_changes = plan.summary() if plan else ""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # our own view replaces the raw log dicts
    trainer.remove_callback(ProgressCallback)
    if resumed_from:
        console.print(f"resuming from {resumed_from}")

    plugins.train_start(config, trainer)
    if resumed_from:
        plugins.resume_checkpoint(config, trainer, str(resumed_from))
    result = trainer.train(resume_from_checkpoint=resumed_from)
    if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        # The Trainer saved a checkpoint at this step and stopped: no final save.
        raise stop.stopped(config, output_dir, trainer.state.global_step, trainer.state.max_steps)
    if watchdog and watchdog.tripped_at is not None:  # the diverged model is not saved
        raise watchdog.stopped(output_dir, trainer.state.max_steps)
    metrics = dict(result.metrics)
    plugins.train_end(config, trainer, metrics)

    output_dir.mkdir(parents=True, exist_ok=True)
    with _final_save(output_dir):
        plugins.before_save(config, trainer.model, str(output_dir), trainer)
        saved = (
            plugins.save_model(config, trainer.model, tokenizer, str(output_dir), trainer)
            or "nothing"
        )
    if is_main_process() and not any(output_dir.glob("*.safetensors")):
        raise ModelError(
            f"the final save wrote no weights to {output_dir} (a save plugin or the engine's "
            "state-dict settings kept them back)\n  fix: report it with `sft plugins list` output; "
            "the last checkpoint-N holds the trained state"
        )
    warnings = [w.render() for w in monitor.warnings]
    if trainer.is_world_process_zero():
        write_resolved_config(config, output_dir)
        losses = [r["loss"] for r in progress.history if "loss" in r]
        write_model_card(
            config,
            output_dir,
            {
                "steps": trainer.state.global_step,
                "final train loss": f"{losses[-1]:.4f}" if losses else "n/a",
            },
        )
        if not write_plot(progress.history, output_dir / "loss.png"):
            console.print("note: install matplotlib (pip install 'sft-train[plot]') for loss.png")
        plugins.after_save(config, str(output_dir))
        claimed.record_result()
        if hub is not None:
            from sft.fsutil import sft_files

            hub.push_result(output_dir, sft_files(output_dir) or [], saved)
    console.print(f"saved {saved} to {output_dir}")
    for line in train_data.summary_lines() if config.streaming else []:  # known only now
        console.print(f"  streamed {line}", markup=False, soft_wrap=True)
    if warnings:
        console.print("[yellow]training-health warnings:[/]")
        for warning in warnings:
            console.print(f"  - {warning}")
    else:
        console.print("training health: no warnings")
    losses = [r["loss"] for r in progress.history if "loss" in r]
    return RunResult(
        output_dir=output_dir,
        saved=saved,
        global_step=trainer.state.global_step,
        train_loss=losses[-1] if losses else None,
        metrics=metrics,
        warnings=warnings,
        resumed_from=resumed_from,
    )


__all__ = ["RunResult", "train"]
