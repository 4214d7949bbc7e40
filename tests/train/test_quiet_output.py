"""`sft run` does not show library noise a user did not ask about: bitsandbytes' "Failed to load
CPU gemm_4bit_forward from kernels-community" (logged when peft imports bitsandbytes on a CPU with
AVX512-BF16 and no `kernels` package) only matters to 4-bit CPU inference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY_CONFIG

NOTICE = "Failed to load CPU gemm_4bit_forward"

# Runs `python -m sft ...` (or -c CODE) as if this CPU had AVX512-BF16: bitsandbytes then tries
# to fetch its CPU kernel at import, exactly as on such machines.
AVX512_BF16 = """
import importlib.abc, importlib.machinery, runpy, sys
from pathlib import Path

MARKER = Path(sys.argv[1])  # written when bitsandbytes asks about the CPU


class Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)

            def has_avx512bf16():
                MARKER.write_text("asked")
                return True

            module.has_avx512bf16 = has_avx512bf16

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Patch())
rest = sys.argv[2:]
if rest[0] == "-c":
    exec(rest[1])
else:
    sys.argv = ["sft", *rest]
    runpy.run_module("sft", run_name="__main__", alter_sys=True)
"""


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "avx512_bf16.py"
    wrapper.write_text(textwrap.dedent(AVX512_BF16))
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, str(wrapper), str(tmp_path / "asked"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_sft_run_does_not_show_the_bitsandbytes_cpu_kernel_notice(tiny_project, tmp_path):
    # The notice is real on such a CPU: importing bitsandbytes alone prints it.
    bare = _run(tmp_path, "-c", "import bitsandbytes")
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert NOTICE in bare.stderr

    (tmp_path / "asked").unlink()
    config = tmp_path / "config.toml"
    config.write_text(
        TINY_CONFIG.replace("{tmp}", str(tmp_path)).replace(
            "num_epochs = 1", "max_steps = 1\nadapter = 'lora'"
        )
    )
    run = _run(tmp_path, "run", str(config))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "asked").exists()  # bitsandbytes was imported (by peft) during the run
    assert NOTICE not in run.stdout + run.stderr
    assert "saved adapter to" in run.stdout
    # torchao, which peft imports whenever it is installed, says nothing either
    if "torchao" in _run(tmp_path, "-c", "import peft").stderr:  # chatter without sft's filters
        assert "torchao" not in run.stdout + run.stderr
        assert "is an Enum subclass" not in run.stdout + run.stderr
