"""The component types plugins register. Plain attrs records: no torch at import time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    from sft.config.schema import Config
    from sft.errors import Problem

ConfigScope = Literal["root", "dataset"]


@attrs.frozen
class ConfigKeys:
    """A group of config keys owned by one plugin: `cls` is a frozen attrs class of `key(...)`s."""

    cls: type
    scope: ConfigScope = "root"
    # Dataset keys only: the `datasets[].type`s they apply to. None: the types this plugin
    # registers (every type, if it registers none). A key set on a dataset of another type is
    # an error that names the type it belongs to.
    dataset_types: tuple[str, ...] | None = None
    # Axolotl integrations (`plugins:` entries, e.g. "axolotl.integrations.liger.LigerPlugin")
    # whose keys these are: a config listing one loads when this plugin is installed.
    axolotl_integrations: tuple[str, ...] = ()


@attrs.frozen
class PromptStrategy:
    """A dataset format selected by `datasets[].type`.

    `factory(dataset_cfg, tokenizer, config)` returns a callable that turns one raw row into an
    `sft.plugin.Rendered` (text + trained character spans) or `Tokenized` (ids + labels); it
    may return a list of them (one row → several samples) or raise `sft.plugin.RowError`.
    """

    name: str
    factory: Callable[..., Callable[[dict[str, Any]], Any]]
    description: str = ""


@attrs.frozen
class Packer:
    """Packs sequence lengths into bins: `pack(lengths, capacity, config, epoch) -> bins`."""

    name: str
    pack: Callable[..., Sequence[Sequence[int]]]
    description: str = ""


@attrs.frozen
class AttentionBackend:
    """An attention implementation selected by `attn_implementation`.

    `packing` says how packed samples are kept apart: `"mask"` (a block-diagonal mask built by
    the collator), `"varlen"` (flash-attn `cu_seqlens` from `position_ids`), `"block_mask"`
    (flex attention) or `None` (cannot pack). `check(config)` returns problems on this machine
    (missing package, no CUDA, wrong dtype) without loading a model.
    """

    name: str
    hf_implementation: str
    packing: Literal["mask", "varlen", "block_mask"] | None
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    check: Callable[[Config], Sequence[Problem]] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    # (True, "") when it can run on this machine, else (False, "why, and how to install it"):
    # shown by `sft plugins list`; `check` is what refuses a config.
    available: Callable[[], tuple[bool, str]] | None = None


@attrs.frozen
class Kernel:
    """A kernel set (liger, ...) a plugin patches into the model in `sft_patch_model`.

    - `available()`: (True, "") when it can run on this machine, else (False, "why, and how
      to install it"); `sft plugins list` shows it.
    - `enabled_by(config)`: the config keys that turn it on in this config (empty: not used).
      A config that turns on an unavailable kernel is refused by `sft validate` (a machine
      problem, skipped by `--portable`), naming those keys.
    - `replaces(config)`: the parts of the model it replaces in this config, named from
      `MODEL_PARTS`, so that other plugins patching the same parts step aside. None (the
      default): any part, as far as they can tell.
    """

    name: str
    available: Callable[[], tuple[bool, str]]
    description: str = ""
    enabled_by: Callable[[Config], Sequence[str]] | None = None
    replaces: Callable[[Config], Sequence[str]] | None = None


# The parts of a model a Kernel's `replaces` names.
MODEL_PARTS = ("rms_norm", "layer_norm", "swiglu", "geglu", "rope", "cross_entropy", "lm_head")


@attrs.frozen
class Optimizer:
    """An optimizer selected by `optimizer`: `factory(param_groups, config)` builds it.

    `uses_model = True`: the factory is called as `factory(param_groups, config, model)`, for
    optimizers that need the model itself (GaLore's target modules, LOMO's fused backward,
    Muon's embeddings and head). Such a factory may hook into the model, so it is called once
    per run (a resume does not build a second one to compare settings).

    `keys` names every plugin config key the factory reads (`("adam_beta1", ...)`, another
    plugin's included). With it, a key only other optimizers read, set while this one is
    selected, is reported as having no effect (`sft.config.ineffective`). None: the keys of its
    plugin, maybe more (then nothing is reported as unread while it is selected).
    """

    name: str
    factory: Callable[..., Any]
    check: Callable[[Config], Sequence[Problem]] | None = None
    description: str = ""
    uses_model: bool = False
    keys: tuple[str, ...] | None = None


@attrs.frozen
class DistributedBackend:
    """A distributed engine (FSDP, DeepSpeed) driven through the HF Trainer and accelerate.

    - `selected(config)`: whether the config asks for this engine (at most one may be).
    - `training_args(config, model)`: the `TrainingArguments` keywords it contributes (e.g.
      `fsdp`/`fsdp_config`, or `deepspeed`), given the model as it will train (with its adapter,
      if any), so it can look up e.g. the decoder layer class to wrap.
    - `check(config)`: problems `sft validate` reports before any process starts (conflicts,
      unsupported combinations); `Problem.machine` for what depends on this machine.
    - `available()`: (True, "") when the engine's runtime is importable here, else (False, "how
      to install it"), shown by `sft plugins list`.
    - `model_kwargs(config)`: keywords the engine adds to the model's `from_pretrained` (e.g.
      transformers' `distributed_config`, which shards the model while it loads).
    """

    name: str
    selected: Callable[[Config], bool]
    training_args: Callable[[Config, Any], dict[str, Any]]
    check: Callable[[Config], Sequence[Problem]] | None = None
    available: Callable[[], tuple[bool, str]] | None = None
    description: str = ""
    model_kwargs: Callable[[Config], dict[str, Any]] | None = None


@attrs.frozen
class Objective:
    """A training objective selected by `objective`: the loss a run minimises instead of the
    model's own causal-LM loss (a distillation term, label smoothing, a preference loss).

    `compute_loss(model, inputs, config, num_items_in_batch)` returns the loss of one
    micro-batch, a scalar tensor (or `(loss, outputs)`), for training and evaluation alike.
    `inputs` is the collated batch (`input_ids`, `labels` with `IGNORE_INDEX` for untrained
    tokens, `attention_mask` or packed `position_ids`). Normalise as the model does, so that
    gradient accumulation and several processes give the same gradient as one big batch: with
    `num_items_in_batch` (the trained tokens of the whole accumulated step on all processes),
    sum the per-token losses and divide by it; without it (evaluation), average over this
    batch's trained tokens. `check(config)` returns the objective's config problems.
    """

    name: str
    compute_loss: Callable[..., Any]
    check: Callable[[Config], Sequence[Problem]] | None = None
    description: str = ""
