"""The plugin API: everything a plugin author imports, from one place.

    from sft import plugin

    @plugin.hookimpl
    def sft_register_prompt_strategies(register):
        register(plugin.PromptStrategy("qa", factory, "question/answer rows"))

The names below are the stable surface (docs/plugins/authoring.md documents each); the rest
of `sft` is private by convention and may change between releases. Importing this module is
light (no torch, no transformers), like every plugin module should be.
"""

from __future__ import annotations

from sft import hookimpl
from sft.components import (
    MODEL_PARTS,
    AttentionBackend,
    ConfigKeys,
    DistributedBackend,
    Kernel,
    Objective,
    Optimizer,
    Packer,
    PromptStrategy,
)
from sft.config.schema import Config, DatasetConfig, key
from sft.data.sample import IGNORE_INDEX, Rendered, RowError, Tokenized, Turn, require
from sft.errors import ConfigError, DataError, PluginError, Problem

__all__ = [
    "IGNORE_INDEX",
    "MODEL_PARTS",
    "AttentionBackend",
    "Config",
    "ConfigError",
    "ConfigKeys",
    "DataError",
    "DatasetConfig",
    "DistributedBackend",
    "Kernel",
    "Objective",
    "Optimizer",
    "Packer",
    "PluginError",
    "Problem",
    "PromptStrategy",
    "Rendered",
    "RowError",
    "Tokenized",
    "Turn",
    "hookimpl",
    "key",
    "require",
]
