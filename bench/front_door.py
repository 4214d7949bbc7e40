"""Wall time of the front door (`sft --help`, `plugins list`, `validate`), target < 0.5 s.

Baseline measured in the same run: a bare `python -c pass` (interpreter start-up) and
`python -c "import torch"` (what the front door would cost if it imported torch).

    python bench/front_door.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=False, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.toml"
        data = Path(tmp) / "a.jsonl"  # validate checks that local dataset files exist
        data.write_text('{"messages": []}\n')
        config.write_text(f'base_model = "m"\n[[datasets]]\npath = "{data}"\n')
        py = sys.executable
        cases = {
            "python -c pass (baseline)": [py, "-c", "pass"],
            "python -c 'import torch' (baseline)": [py, "-c", "import torch"],
            "sft --help": [py, "-m", "sft", "--help"],
            "sft plugins list": [py, "-m", "sft", "plugins", "list"],
            "sft plugins list --json": [py, "-m", "sft", "plugins", "list", "--json"],
            "sft validate": [py, "-m", "sft", "validate", str(config)],
        }
        results = {name: wall(argv, args.repeat) for name, argv in cases.items()}
    base = results["python -c pass (baseline)"]
    torch_time = results["python -c 'import torch' (baseline)"]
    print(f"{'command':40} {'median s':>9} {'x python':>9} {'x torch':>8}  target")
    for name, seconds in results.items():
        target = "" if "baseline" in name else ("< 0.5 s ok" if seconds < 0.5 else "< 0.5 s MISSED")
        print(
            f"{name:40} {seconds:9.3f} {seconds / base:9.1f} {seconds / torch_time:8.2f}  {target}"
        )


if __name__ == "__main__":
    main()
