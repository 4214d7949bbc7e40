"""LoRA's backward with x's gradient summed in place, against autograd's, in one process.

The `sft-packed-chunked-ce` job of `bench/train_vs_trl.py` (SmolLM2-135M-Instruct, LoRA r16 on
all linear layers, sequence_len 512, micro-batch 4, packed, chunked CE, fp32), loaded as
`sft run` loads it. After its first optimizer step, the forward and backward of its next
micro-batches are timed with each frozen linear layer + LoRA computed two ways, alternating
round by round so a slow spell of a shared machine falls on both:

- `lean`: `lean_activations`' `LoraLinear` Function (what sft runs): the base product's input
  gradient takes LoRA's share `(g B s) A` in place (`addmm_`);
- `autograd`: the same forward ops recorded by autograd (`F.linear`, `F.linear`, `addmm_`, as
  sft ran before): LoRA's share of the input gradient is its own full-width tensor, then added.

Prints each side's median seconds (and every round's), their ratio, the loss of each and the
largest difference between their LoRA gradients (0 when they are the same to the bit).

    python bench/lora_backward.py [--rows 64] [--rounds 6] [--batches 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_trl import base_model_dir, conversations


class AutogradPath:
    """`LoraLinear.apply`'s signature, computed by the ops autograd records."""

    @staticmethod
    def apply(rows: Any, weight: Any, bias: Any, a: Any, b: Any, scaling: float) -> Any:
        import torch.nn.functional as F

        out = F.linear(rows, weight, bias)
        return out.addmm_(F.linear(rows, a), b.t(), alpha=scaling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=2, help="micro-batches timed per round")
    args = parser.parse_args()

    from rich.console import Console
    from transformers import TrainerCallback

    from sft import hookimpl
    from sft.config import load_config_text
    from sft.manager import SftPlugins
    from sft.plugins.lean_activations import lora
    from sft.train.run import train

    def measure(model: Any, batches: list[dict]) -> None:
        lean = lora._lora_linear()
        paths = {"lean": lean, "autograd": AutogradPath}

        def one_round(name: str) -> tuple[float, float, list[Any]]:
            lora._FUNCTION[:] = [paths[name]]
            start = time.perf_counter()
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
            seconds = time.perf_counter() - start
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            model.zero_grad(set_to_none=True)
            return seconds, loss.item(), grads

        try:
            for name in paths:  # warm both
                one_round(name)
            times: dict[str, list[float]] = {name: [] for name in paths}
            last: dict[str, tuple[float, list[Any]]] = {}
            for index in range(args.rounds):
                for name in paths if index % 2 == 0 else reversed(paths):
                    seconds, loss, grads = one_round(name)
                    times[name].append(seconds)
                    last[name] = (loss, grads)
        finally:
            lora._FUNCTION[:] = [lean]
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        print(f"{len(batches)} micro-batches ({tokens} tokens) per round, {args.rounds} rounds")
        for name, found in times.items():
            rounds = ", ".join(f"{t:.2f}" for t in found)
            print(f"{name:9} {statistics.median(found):6.2f} s (rounds: {rounds})")
        ratio = statistics.median(times["lean"]) / statistics.median(times["autograd"])
        difference = max(
            (a - b).abs().max().item()
            for a, b in zip(last["lean"][1], last["autograd"][1], strict=True)
        )
        print(
            f"lean / autograd: {ratio:.3f} of the time; loss {last['lean'][0]:.7f} / "
            f"{last['autograd'][0]:.7f}; largest LoRA gradient difference {difference:.3g}"
        )

    class Measure(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(
            self, args_: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if state.global_step != 1:  # step 1 done: warm
                return
            batches = []
            for batch in kwargs["train_dataloader"]:
                batches.append(batch)
                if len(batches) == args.batches:
                    break
            measure(model, batches)
            control.should_training_stop = True

    class MeasurePlugin:
        @hookimpl
        def sft_trainer_callbacks(self, config: Any) -> list[Any]:
            return [Measure()]

    workdir = Path(tempfile.mkdtemp())
    rows = conversations(args.rows)
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plugins = SftPlugins.load(environ={})
    plugins.register(MeasurePlugin(), name="measure")
    config = load_config_text(
        f'base_model = "{base_model_dir()}"\nadapter = "lora"\nlora_r = 16\nlora_alpha = 32\n'
        "lora_target_linear = true\nlora_dropout = 0.0\nsequence_len = 512\nmicro_batch_size = 4\n"
        "max_steps = 3\nlearning_rate = 2e-4\nseed = 1\nsample_packing = true\n"
        f'chunked_cross_entropy = true\nsave_strategy = "no"\noutput_dir = "{workdir / "out"}"\n'
        f'[[datasets]]\npath = "{workdir / "chat.jsonl"}"\ntype = "chat_template"\n',
        plugins=plugins,
    )
    train(config, plugins, console=Console(quiet=True))


if __name__ == "__main__":
    main()
