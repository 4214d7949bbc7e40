"""What this machine can run, answered without importing torch (for `sft validate`).

`cuda_present()` looks for the NVIDIA driver the way the CUDA runtime would find it; the model
loader confirms with torch before anything runs, so a wrong guess here only moves the error.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path


@functools.cache
def cuda_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if Path("/proc/driver/nvidia/version").exists():
        return True
    return any(Path("/dev").glob("nvidia[0-9]*"))


def installed(module: str) -> bool:
    """Whether a module can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
