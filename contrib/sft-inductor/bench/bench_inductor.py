"""Speed of sft-inductor's compiled RMSNorm + RoPE against the plain (eager) path, one invocation.

A SmolLM2-135M-shaped Llama (random init: speed does not depend on the weights) with a LoRA
adapter on every linear layer (r=16), trained with AdamW on fixed 4 x 512-token batches (what
sample packing gives), fp32, no gradient checkpointing. Each variant runs in its own process,
one after the other, with the same data and settings; the first (compiling) step is reported
apart from the timed steps. Prints s/step, tokens/s, the ratio to eager, the compile overhead
and the number of steps after which the plugin has paid for it.

    python contrib/sft-inductor/bench/bench_inductor.py [--steps 6] [--batch 4] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run_variant(variant: str, steps: int, batch: int, seq: int) -> dict[str, float]:
    import sft_inductor
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if variant == "inductor":
        sft_inductor.compile_rms_norms(model)
        sft_inductor.compile_rope(sft_inductor.rotary_module(model))
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(
        0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)
    )

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    start = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - start
    step()  # a second warm-up step: allocator and thread pools settle
    start = time.perf_counter()
    for _ in range(steps):
        last_loss = step()
    per_step = (time.perf_counter() - start) / steps
    return {"first": first, "per_step": per_step, "first_loss": first_loss, "last_loss": last_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.seq)))
        return

    import torch

    tokens = args.batch * args.seq
    print(
        f"SmolLM2-135M shape, LoRA r=16 all-linear, AdamW, fp32, sdpa, no gradient "
        f"checkpointing, {args.batch} x {args.seq} tokens/step, {args.steps} timed steps after "
        f"2 warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
    )
    results = {}
    for variant in ("eager", "inductor"):
        argv = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
        argv += ["--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    eager, fused = results["eager"], results["inductor"]
    print(
        f"{'variant':<10} {'first step s':>12} {'s/step':>8} {'tokens/s':>9} {'vs eager':>9}  loss (first, last)"
    )
    for name, r in results.items():
        print(
            f"{name:<10} {r['first']:>12.2f} {r['per_step']:>8.3f} {tokens / r['per_step']:>9.1f} "
            f"{eager['per_step'] / r['per_step']:>8.3f}x  {r['first_loss']:.5f}, {r['last_loss']:.5f}"
        )
    saved = eager["per_step"] - fused["per_step"]
    overhead = (fused["first"] - fused["per_step"]) - (eager["first"] - eager["per_step"])
    if saved > 0:
        print(
            f"compile overhead {overhead:.1f} s, repaid after {max(overhead, 0) / saved:.0f} steps"
        )
    else:
        print(f"compile overhead {overhead:.1f} s, never repaid here (no step-time saving)")


if __name__ == "__main__":
    main()
