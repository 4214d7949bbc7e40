"""What a training process's memory holds: the packed LoRA job of `bench/train_vs_trl.py`.

The `sft-packed-chunked-ce` job (SmolLM2-135M-Instruct, LoRA r16 on all linear layers,
sequence_len 512, micro-batch 4, packed, chunked CE), loaded the way `sft run` loads it, then
one training step taken by hand on its first micro-batch. Reported, as resident memory (RSS) the
process gains at each stage:

- imports (python, torch, transformers, peft, datasets, sft);
- the tokenizer and the prepared data;
- the model (weights in the training dtype), then the adapter;
- the forward pass, with the bytes autograd saves for the backward pass counted exactly
  (`torch.autograd.graph.saved_tensors_hooks`, each storage once), by dtype;
- the backward pass (the peak during it: gradients and the backward's temporaries);
- the optimizer step (AdamW's two moments for every trainable parameter).

Peaks come from the kernel's high-water mark (VmHWM), reset before each stage (Linux
`/proc/self/clear_refs`). Each dtype runs in its own process.

    python bench/memory_breakdown.py [--rows 64] [--dtypes float32,bfloat16] [--lean off,on]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_trl import run_child

MIB = 1024 * 1024


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak() -> int:
    return _status("VmHWM")


def child(dtype_name: str, rows: int, lean: bool) -> dict[str, Any]:
    stages: list[tuple[str, int, int]] = []  # (stage, RSS after, peak during)
    start = rss()

    def mark(stage: str) -> None:
        stages.append((stage, rss(), peak()))
        reset_peak()

    reset_peak()
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from rich.console import Console
    from train_vs_trl import base_model_dir, conversations

    from sft.config import load_config_text
    from sft.data.collate import Collator, pad_id_of
    from sft.data.packing import pack_prepared
    from sft.data.pipeline import prepare_datasets
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer
    from sft.train.trainer import build_optimizer

    mark("imports")
    workdir = Path(tempfile.mkdtemp())
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations(rows)))
    config = load_config_text(
        f'base_model = "{base_model_dir()}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\n'
        "lora_target_linear = true\nlora_dropout = 0.0\nsequence_len = 512\nmicro_batch_size = 4\n"
        "max_steps = 1\nlearning_rate = 2e-4\nseed = 1\nsample_packing = true\n"
        f'chunked_cross_entropy = true\noutput_dir = "{workdir / "out"}"\n'
        f"bf16 = {'true' if dtype_name == 'bfloat16' else 'false'}\n"
        f"lean_activations = {'true' if lean else 'false'}\n"
        f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n'
    )
    plugins = get_plugins()
    tokenizer = load_tokenizer(config, plugins)
    prepared = prepare_datasets(config, tokenizer, plugins, show_progress=False)
    train_data, _ = pack_prepared(config, prepared, plugins, Console(quiet=True))
    batch = Collator(pad_id_of(tokenizer))([train_data[i] for i in range(4)])
    mark("tokenizer + prepared data")
    model = load_model(config, tokenizer, plugins)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    mark("model weights")
    model = apply_adapter(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    mark("adapter")

    saved: dict[int, tuple[int, str]] = {}

    def pack_hook(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = (storage.nbytes(), str(tensor.dtype).removeprefix("torch."))
        return tensor

    tokens = int((batch["labels"] != -100).sum())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t), autocast:
        loss = model(**batch).loss
    mark("forward")
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    mark("backward")
    optimizer = build_optimizer(plugins.optimizers().get("adamw_torch"), model, config)
    optimizer.step()
    moments = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.ndim
    )
    mark("optimizer step")
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return {
        "start": start,
        "stages": stages,
        "weights": weights,
        "adapter": adapter,
        "grads": grads,
        "moments": moments,
        "saved_for_backward": by_dtype,
        "tokens_in_batch": int(batch["input_ids"].numel()),
        "trained_tokens": tokens,
    }


def report(dtype_name: str, r: dict[str, Any]) -> None:
    print(f"\n{dtype_name}: one packed micro-batch of {r['tokens_in_batch']} tokens")
    print(f"  {'stage':28} {'RSS after':>10} {'gained':>9} {'peak in it':>11}")
    before = r["start"]
    print(f"  {'(interpreter)':28} {before / MIB:8.0f} M")
    for stage, after, top in r["stages"]:
        print(
            f"  {stage:28} {after / MIB:8.0f} M {(after - before) / MIB:+8.0f} M {top / MIB:9.0f} M"
        )
        before = after
    saved = r["saved_for_backward"]
    total = sum(saved.values())
    parts = ", ".join(f"{d} {n / MIB:.0f} M" for d, n in sorted(saved.items()))
    print(
        f"  model weights {r['weights'] / MIB:.0f} M; LoRA weights {r['adapter'] / MIB:.1f} M, "
        f"their gradients {r['grads'] / MIB:.1f} M, AdamW moments {r['moments'] / MIB:.1f} M"
    )
    print(
        f"  saved for backward: {total / MIB:.0f} M ({parts}), "
        f"{total / r['tokens_in_batch'] / 1024:.0f} KiB per token"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--lean", default="off,on", help="lean_activations settings to run: off, on or both"
    )
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        dtype_name, lean = args.child.split(":")
        print("RESULT " + json.dumps(child(dtype_name, args.rows, lean == "on")))
        return
    for dtype_name in args.dtypes.split(","):
        for lean in args.lean.split(","):
            label = f"{dtype_name}, lean_activations {lean}"
            argv = ["--child", f"{dtype_name}:{lean}", "--rows", str(args.rows)]
            result = run_child(__file__, argv, label)
            if result is not None:
                report(label, result)


if __name__ == "__main__":
    main()
