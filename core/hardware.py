"""What this machine can run, answered without importing torch (for `sft validate`).

`cuda_present()` looks for the NVIDIA driver the way the CUDA runtime would find it; the model
loader confirms with torch before anything runs, so a wrong guess here only moves the error.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any


@functools.cache
def cuda_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if Path("/proc/driver/nvidia/version").exists():
        return True
    return any(Path("/dev").glob("nvidia[0-9]*"))


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None (without importing it)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def bitsandbytes_runs_on_cpu() -> bool:
    """bitsandbytes quantizes and runs 4/8-bit layers on CPU from 0.46 (0.48 adds the
    parametrizations quantize_moe_experts uses; sft tests 0.48 and later)."""
    from packaging.version import Version

    version = package_version("bitsandbytes")
    return version is not None and Version(version) >= Version("0.48")


def installed(module: str) -> bool:
    """Whether a module can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cpu_bf16_unit() -> str | None:
    """The CPU's native bf16 matmul unit ("AMX" or "AVX-512 BF16"), or None. Read from
    /proc/cpuinfo's flags (Linux), as torch.cpu._is_amx_tile_supported reports it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def cpu_matmul_slowdown(dtype: Any, size: int = 256, repeats: int = 5) -> float:
    """How many times longer a `size`² matmul takes in `dtype` than in float32 on this CPU: the
    fastest of `repeats` timed products each, alternating, after a warm-up (the fastest, so that
    another process's burst does not decide it). Without a native unit for it (AMX, AVX-512
    BF16 / FP16) torch's CPU matmul in bf16 or fp16 falls back to a slow loop: 50-60x the
    float32 time here on an AVX2-only CPU, 100-600x for larger products on two threads
    (docs/benchmarks.md)."""
    import time

    import torch

    operands = {
        of: (torch.randn(size, size).to(of), torch.randn(size, size).to(of))
        for of in (dtype, torch.float32)
    }
    best = dict.fromkeys(operands, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(repeats + 1):
            for of, (a, b) in operands.items():
                start = time.perf_counter()
                torch.mm(a, b)
                if round_:  # round 0 warms up
                    best[of] = min(best[of], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[dtype] / max(best[torch.float32], 1e-9)
