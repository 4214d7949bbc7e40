"""Config: attrs schema, TOML/YAML loading with every problem collected, docs generation."""

from __future__ import annotations

from sft.config.loader import load_config, load_config_text
from sft.config.schema import Config, DatasetConfig, key

__all__ = ["Config", "DatasetConfig", "key", "load_config", "load_config_text"]
