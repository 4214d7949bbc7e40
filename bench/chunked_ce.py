"""Peak memory and step time: chunked cross-entropy against the plain LM head + loss, same run.

A SmolLM2-shaped model (vocab 49152, hidden 576; 4 layers so the head dominates), random init,
fp32 on CPU, batch 4 × 512 tokens, 60% of tokens trained. Each variant runs in its own process
(peak RSS is per process); the baseline is transformers' own forward with labels.
`chunked-unfused` is the chunked path with the head's fused loss turned off (a no-op forward
hook on the head makes it take the generic, checkpointed log-softmax path).

    python bench/chunked_ce.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, steps: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    if variant.startswith("chunked"):
        from sft.plugins.chunked_ce import patch

        patch(model, chunk=1024)
    if variant == "chunked-unfused":
        model.lm_head.register_forward_pre_hook(lambda module, args: None)
    ids = torch.randint(0, 49152, (4, 512))
    labels = ids.clone()
    labels[:, :200] = -100
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "variant": variant,
                "step_s": min(times),
                "peak_mib": peak / 1024,
                "training_mib": (peak - base) / 1024,
                "loss": loss.item(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    results = {}
    for variant in ("plain", "chunked-unfused", "chunked"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, unfused, chunked = results["plain"], results["chunked-unfused"], results["chunked"]
    for r in (plain, unfused, chunked):
        print(
            f"{r['variant']:15} step {r['step_s']:.2f} s | peak RSS {r['peak_mib']:.0f} MiB (training adds {r['training_mib']:.0f} MiB) | loss {r['loss']:.4f}"
        )
    print(
        f"chunked / plain: memory added by training {chunked['training_mib'] / plain['training_mib']:.2f}x, peak {chunked['peak_mib'] / plain['peak_mib']:.2f}x, step time {chunked['step_s'] / plain['step_s']:.2f}x"
    )
    print(
        f"chunked / chunked-unfused: step time {chunked['step_s'] / unfused['step_s']:.2f}x, "
        f"memory added by training {chunked['training_mib'] / unfused['training_mib']:.2f}x"
    )


if __name__ == "__main__":
    main()
