"""Where a training step's time goes: torch.profiler over sft's packed LoRA run.

The same job as `bench/train_vs_trl.py`'s `sft-packed-chunked-ce` row (SmolLM2-135M-Instruct,
LoRA r16 on all linear layers, sequence_len 512, micro-batch 4, packed, chunked CE, fp32,
no gradient checkpointing). Step 1 warms up; steps 2..N are recorded. Prints the top operators
by self CPU time, then the time grouped into matmuls (the model's and LoRA's), attention,
cross-entropy, optimizer, and the rest, as shares of the recorded wall time; then the real
tokens/s of the recorded steps against the matmul limit (`bench/train_vs_trl.py`'s: the GEMM
rate / 4 FLOP per linear parameter), and the bounds if the time outside the matmuls (and
attention) were zero: how far removing elementwise work alone could take this job.

    python bench/profile_train.py [--rows 64] [--steps 4] [--top 25] [--bf16] [--shapes]

`--bf16` profiles the same job with `bf16 = true` (bf16 weights, CPU autocast).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_trl import (
    base_model_dir,
    conversations,
    linear_parameters,
    logged_rate,
    matmul_gflops,
)

GROUPS = {
    "matmul (linear layers, LoRA)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "optimizer (AdamW)": ("aten::_foreach", "Optimizer.step", "aten::_fused_adam"),
    "cross-entropy": ("aten::log_softmax", "aten::_log_softmax", "aten::nll_loss", "chunked"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (bf16 = true)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra config line (TOML), e.g. --set lean_activations=false",
    )
    parser.add_argument(
        "--shapes", action="store_true", help="also list the top operators by input shape"
    )
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from transformers import TrainerCallback

    from sft import hookimpl
    from sft.config import load_config_text
    from sft.manager import SftPlugins
    from sft.train.run import train

    workdir = Path(tempfile.mkdtemp())
    rows = conversations(args.rows)
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes
    )
    recorded: dict[str, float] = {}

    class Record(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args_: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == 1:  # step 1 done: warm
                profiler.start()
                recorded["start"] = time.perf_counter()
                recorded["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_train_end(self, args_: Any, state: Any, control: Any, **_: Any) -> None:
            recorded["seconds"] = time.perf_counter() - recorded["start"]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - recorded["faults"]
            recorded["faults"] = faults
            profiler.stop()

    class ProfilePlugin:
        @hookimpl
        def sft_trainer_callbacks(self, config: Any) -> list[Any]:
            return [Record()]

    plugins = SftPlugins.load(environ={})
    plugins.register(ProfilePlugin(), name="profile")
    config = load_config_text(
        f'base_model = "{base_model_dir()}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\n'
        "lora_target_linear = true\nlora_dropout = 0.0\nsequence_len = 512\nmicro_batch_size = 4\n"
        f"max_steps = {args.steps}\nlearning_rate = 2e-4\nseed = 1\nsample_packing = true\n"
        f'chunked_cross_entropy = true\noutput_dir = "{workdir / "out"}"\n'
        f"bf16 = {'true' if args.bf16 else 'false'}\n"
        + "".join(f"{line}\n" for line in args.set)
        + f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n',
        plugins=plugins,
    )
    dtype = "bfloat16" if args.bf16 else "float32"
    gemm_before = matmul_gflops(dtype)
    train(config, plugins, console=Console(quiet=True))
    events = profiler.key_averages()
    wall = recorded["seconds"] * 1e6  # microseconds
    print(
        f"{args.steps - 1} recorded steps, {recorded['seconds']:.1f} s; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; "
        f"{recorded['faults'] / (args.steps - 1):.0f} minor page faults per step"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.shapes:
        by_shape = profiler.key_averages(group_by_input_shape=True)
        print(
            by_shape.table(
                sort_by="self_cpu_time_total",
                row_limit=args.top,
                max_name_column_width=40,
                max_shapes_column_width=90,
            )
        )
    grouped = dict.fromkeys(GROUPS, 0.0)
    for event in events:
        for group, prefixes in GROUPS.items():
            if event.key.startswith(prefixes):
                grouped[group] += event.self_cpu_time_total
                break
    for group, micros in grouped.items():
        print(f"{group:32} {micros / 1e6:7.2f} s  {micros / wall:6.1%} of the recorded time")
    rest = wall - sum(grouped.values())
    print(f"{'everything else':32} {rest / 1e6:7.2f} s  {rest / wall:6.1%}")
    gemm_after = matmul_gflops(dtype)
    print_bounds(workdir / "out", grouped, wall, dtype, max(gemm_before, gemm_after))


def print_bounds(
    output_dir: Path, grouped: dict[str, float], wall: float, dtype: str, gflops: float
) -> None:
    """The recorded steps' real tokens/s as a share of the matmul limit, and what it would be
    if only the matmuls (and attention) took time, at the per-op times just recorded."""
    limit = gflops * 1e9 / (4 * linear_parameters())
    rate = logged_rate(output_dir)["tokens_per_s"]
    matmuls = grouped["matmul (linear layers, LoRA)"] / wall
    attention = grouped["attention (sdpa)"] / wall
    print(
        f"matmul limit, {dtype}: {limit:.0f} real tok/s (GEMM {gflops:.0f} GFLOP/s, the larger of before and after)"
    )
    print(f"recorded steps (under the profiler): {rate:.1f} real tok/s, {rate / limit:.0%} of it")
    for what, share in (("matmuls and attention", matmuls + attention), ("matmuls", matmuls)):
        bound = rate / share
        print(f"if only the {what} took time: {bound:.1f} real tok/s, {bound / limit:.0%} of it")


if __name__ == "__main__":
    main()
