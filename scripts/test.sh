#!/usr/bin/env bash
# Set up (if needed), lint, type-check the core and the built-in plugins, and run the whole
# test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${SFT_VENV:-.venv}"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy" core plugins
"$venv/bin/python" -m pytest "$@"
