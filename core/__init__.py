"""sft: plugin-extensible supervised fine-tuning for causal language models.

The import of this package is deliberately light (no torch, no transformers): the front door
(`sft --help`, `sft plugins list`, `sft validate`) must stay fast.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("sft")
"""Decorator marking a plugin function as an implementation of an `sft_*` hook."""

__all__ = ["__version__", "hookimpl"]
