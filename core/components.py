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
    # Axolotl integrations (`plugins:` entries, e.g. "axolotl.integrations.liger.LigerPlugin")
    # whose keys these are: a config listing one loads when this plugin is installed.
    axolotl_integrations: tuple[str, ...] = ()


@attrs.frozen
class PromptStrategy:
    """A dataset format selected by `datasets[].type`.

    `factory(dataset_cfg, tokenizer, config)` returns a callable that turns one raw row into an
    `sft.data.sample.Rendered` (text + trained character spans) or `Tokenized` (ids + labels); it
    may return a list of them (one row → several samples) or raise `sft.data.sample.RowError`.
    `columns` lists the row fields the strategy reads (for error messages and the cache key).
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


@attrs.frozen
class Kernel:
    """A kernel set (liger, ...): `available()` says whether it can run here, and why not."""

    name: str
    available: Callable[[], tuple[bool, str]]
    description: str = ""


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
