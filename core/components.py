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
    """An optimizer selected by `optimizer`: `factory(param_groups, config)` builds it."""

    name: str
    factory: Callable[[Any, Config], Any]
    check: Callable[[Config], Sequence[Problem]] | None = None
    description: str = ""


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
    """

    name: str
    selected: Callable[[Config], bool]
    training_args: Callable[[Config, Any], dict[str, Any]]
    check: Callable[[Config], Sequence[Problem]] | None = None
    available: Callable[[], tuple[bool, str]] | None = None
    description: str = ""
