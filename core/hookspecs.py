"""Hook specifications: every stage a plugin can take part in.

Grouped by the stage of a run in which they are called. All hooks are prefixed `sft_`.
Registration hooks (`sft_register_<things>(register)`) are called once per process when the
corresponding registry is first needed; each implementation is called with a `register`
callable bound to its own plugin name, so the registry knows which plugin provides what.

A plugin's top-level module imports only `sft` and the standard library; torch,
transformers and friends are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sft.components import (
        AttentionBackend,
        ConfigKeys,
        DistributedBackend,
        Kernel,
        Objective,
        Optimizer,
        Packer,
        PromptStrategy,
    )
    from sft.config.schema import Config
    from sft.errors import Problem

hookspec = pluggy.HookspecMarker("sft")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@hookspec
def sft_config_keys() -> Sequence[ConfigKeys]:
    """Declare the config keys this plugin owns.

    Called when a config is loaded (also by `sft validate` and `sft plugins list`), before any
    value is checked. Each `ConfigKeys` names a scope (`"root"` for top-level keys, `"dataset"`
    for keys of a `[[datasets]]` entry) and a frozen attrs class whose fields are the keys, with
    their types, defaults and a one-line doc (`sft.config.schema.key(...)`).

    A key that no plugin and not the core declares is rejected as unknown (with a did-you-mean).
    Dataset keys belong to the dataset types this plugin registers (or to
    `ConfigKeys.dataset_types`): set on a dataset of another type, they are an error naming
    the type they belong to. Two owners declaring the same key block only the configs that set
    it (an error naming both); `sft plugins list` shows the conflict on both plugins. Prefix
    third-party keys with the plugin's name (`dolly_context_heading`) to stay clear of others.

    :return: the key groups this plugin owns (empty when it owns none).
    """


@hookspec
def sft_validate_config(config: Config) -> Sequence[Problem]:
    """Check the parts of a fully structured config that this plugin is responsible for.

    Called once per config load after every key has been type-checked, so `config` is a valid
    `Config` object; use `config.section(MyKeys)` to read the keys this plugin owns. Must not
    load models or import torch: `sft validate` runs it. Called on every plugin, selected or
    not; a plugin checks only what concerns it (e.g. an optimizer plugin checks its options only
    when `config.optimizer` is one of its optimizers).

    :param config: the structured config.
    :return: problems (`sft.errors.Problem`), empty when all is well. Problems from every plugin
        are reported together with the core's own.
    """


@hookspec
def sft_prepare_tokenizer(tokenizer: Any, config: Config) -> None:
    """Adjust the loaded tokenizer in place (e.g. set the chat template the config selects).

    Called once per process after the tokenizer is loaded and the config's `special_tokens` and
    `tokens` are applied, before any data is prepared. Whatever is set here is saved with the
    model, so `sft chat` and plain transformers see the same template the data was rendered with.

    :param tokenizer: the `transformers` fast tokenizer.
    :param config: the run's config.
    """


# --------------------------------------------------------------------------------------------
# components: registered by name, selected by the config
# --------------------------------------------------------------------------------------------


@hookspec
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    """Register dataset formats, selected by `datasets[].type`.

    Called once, when the prompt-strategy registry is first needed. Call `register(strategy)`
    for each `sft.plugin.PromptStrategy`: a name and a factory
    `factory(dataset_cfg, tokenizer, config) -> render`, called once per dataset, where
    `render(row)` returns an `sft.plugin.Rendered` (the text and the character spans to train;
    the core tokenises and labels it), an `sft.plugin.Tokenized` (ids and labels), or a list
    of them, and raises `sft.plugin.RowError` for a malformed row. Anything else is a plugin
    error naming the strategy, its plugin and package, and the first row it happened on.

    :param register: adds one strategy; a name registered twice (by any plugins) is an error.
    """


@hookspec
def sft_register_packers(register: Callable[[Packer], None]) -> None:
    """Register sample packers, selected by `sample_packer` when `sample_packing = true`.

    Called once, when the packer registry is first needed. A packer turns sequence lengths into
    bins (lists of row indices), each bin filling at most one packed sequence.

    :param register: adds one `sft.components.Packer`.
    """


@hookspec
def sft_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    """Register attention implementations, selected by `attn_implementation`.

    Called once, when the attention-backend registry is first needed. An
    `sft.components.AttentionBackend` says which transformers implementation it maps to, whether
    it can keep packed samples apart and what it needs for that, which dtypes it allows, and how
    to check availability on this machine (at `sft validate` time, without loading a model).

    :param register: adds one backend.
    """


@hookspec
def sft_register_kernels(register: Callable[[Kernel], None]) -> None:
    """Register kernel sets (e.g. liger), each enabled by config keys the plugin owns.

    Called once, when the kernel registry is first needed. The plugin patches the model in
    `sft_patch_model`; the core uses the `sft.plugin.Kernel` record to refuse (at `sft
    validate`) a config that turns on a kernel this machine cannot run, and `sft plugins
    list` shows the kernel as "unavailable" with the reason and how to install it.

    :param register: adds one `sft.components.Kernel`.
    """


@hookspec
def sft_patch_model(model: Any, config: Config) -> None:
    """Patch a loaded model in place (kernels, layer replacements) before adapters are applied.

    Called once per run, after the model is loaded and before the adapter is attached. Every
    plugin is called; a plugin acts only when the config enables one of its features.

    :param model: the `transformers.PreTrainedModel` just loaded.
    :param config: the run's config.
    """


@hookspec
def sft_register_optimizers(register: Callable[[Optimizer], None]) -> None:
    """Register optimizers, selected by `optimizer`.

    Called once, when the optimizer registry is first needed. An `sft.components.Optimizer` has
    a name and a factory `factory(param_groups, config) -> torch.optim.Optimizer` (with
    `uses_model = True`: `factory(param_groups, config, model)`). Each param group may carry its
    own `lr` (LoRA+); a factory passes the groups on as they are.

    :param register: adds one optimizer.
    """


@hookspec
def sft_register_distributed_backends(register: Callable[[DistributedBackend], None]) -> None:
    """Register distributed engines (FSDP, DeepSpeed), each selected by config keys.

    Called once, when the distributed-backend registry is first needed. A
    `sft.components.DistributedBackend` says when it is selected and which Trainer/accelerate
    settings it contributes.

    :param register: adds one backend.
    """


@hookspec
def sft_register_objectives(register: Callable[[Objective], None]) -> None:
    """Register training objectives, selected by `objective`.

    Called once, when the objective registry is first needed. An `sft.plugin.Objective`
    computes the loss of each micro-batch in place of the model's own causal-LM loss; only the
    objective a config selects runs. This is how a training stage beyond SFT (distillation,
    a preference loss built on TRL's losses) ships as a third-party plugin.

    :param register: adds one objective.
    """


# --------------------------------------------------------------------------------------------
# run: observers at boundaries only, never inside the training step
# --------------------------------------------------------------------------------------------


@hookspec
def sft_trainer_callbacks(config: Config) -> Sequence[Any]:
    """Contribute `transformers.TrainerCallback` instances to the run's trainer.

    Called once per run, while the trainer is built.

    :param config: the run's config.
    :return: callbacks (may be empty).
    """


@hookspec
def sft_train_start(config: Config, trainer: Any) -> None:
    """Observe the start of training.

    Called once per run, after the trainer is built and before the first step.

    :param config: the run's config.
    :param trainer: the `transformers.Trainer` that will train.
    """


@hookspec
def sft_train_end(config: Config, trainer: Any, metrics: dict[str, float]) -> None:
    """Observe the end of training.

    Called once per run, after the last step and before the final save.

    :param config: the run's config.
    :param trainer: the trainer.
    :param metrics: final training metrics (`train_loss`, `train_runtime`, ...).
    """


@hookspec
def sft_save_checkpoint(config: Config, trainer: Any, checkpoint_dir: str) -> None:
    """Write a plugin's own training state (state the model, optimizer and scheduler do not
    hold) into a checkpoint being written.

    Called on the main process for every checkpoint, after the trainer wrote its files:
    `checkpoint_dir` is the checkpoint's staging directory, renamed into place only after
    every implementation returned, so a kill never leaves a checkpoint without this state.

    :param config: the run's config.
    :param trainer: the trainer (`trainer.model`, `trainer.state.global_step`, ...).
    :param checkpoint_dir: the directory to write into.
    """


@hookspec
def sft_resume_checkpoint(config: Config, trainer: Any, checkpoint_dir: str) -> None:
    """Restore what `sft_save_checkpoint` wrote, before training resumes.

    Called on every process when a run resumes, before the trainer loads the checkpoint's
    model, optimizer and scheduler state and takes its first step. A checkpoint lacking the
    plugin's state (written without the plugin) should raise an `SftError` saying so.

    :param config: the run's config.
    :param trainer: the trainer.
    :param checkpoint_dir: the checkpoint being resumed.
    """


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


@hookspec
def sft_before_save(config: Config, model: Any, output_dir: str, trainer: Any) -> None:
    """Prepare a model for saving (e.g. ask the engine for a full state dict).

    Called once before the final save, on every rank.

    :param config: the run's config.
    :param model: the trained model (possibly a peft model or a wrapped engine model).
    :param output_dir: where the model will be written.
    :param trainer: the run's trainer (its `accelerator` knows the distributed engine).
    """


@hookspec(firstresult=True)
def sft_save_model(
    config: Config, model: Any, tokenizer: Any, output_dir: str, trainer: Any
) -> str | None:
    """Write the trained model and tokenizer to `output_dir`.

    Called once per run after `sft_before_save`, on every rank: a distributed engine gathers
    the weights with a collective, so every rank must take part; only the main process writes
    files. First result wins: the core's default implementation is `trylast` and saves through
    the trainer (which gathers FSDP and DeepSpeed ZeRO-3 weights) the adapter or the full model
    in safetensors, plus the tokenizer; a plugin that must save differently returns a short
    description of what it wrote to stop the chain.

    :param config: the run's config.
    :param model: the trained model.
    :param tokenizer: the tokenizer (with its chat template).
    :param output_dir: the directory to write into (it exists).
    :param trainer: the run's trainer, or None when saving outside a training run.
    :return: a description of what was written, or `None` to let the next implementation save.
    """


@hookspec
def sft_after_save(config: Config, output_dir: str) -> None:
    """Act on the saved output (model card, merge, upload).

    Called once after the final save, on the main process only.

    :param config: the run's config.
    :param output_dir: the directory the model was written to.
    """
