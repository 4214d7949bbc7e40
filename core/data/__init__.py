"""Datasets: sources → prompt strategy (render + spans) → batched tokenising → labels → cache.

This package's top level stays light (no `datasets`, no torch): plugins import
`sft.data.sample` at module import time.
"""
