"""A launcher's worker ends with its command's exit code, even when an engine still holds a
process group with a collective in flight (DeepSpeed's and FSDP's groups outlive
`destroy_process_group`): left to interpreter teardown, gloo's thread then aborts the process
("terminate called without an active exception", exit -6) after its work is done.

Two real processes on gloo, started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = """
import atexit, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
engine_group = dist.new_group([0, 1])  # referenced past destroy_process_group, as engines do
in_flight = []


def start_a_collective_nobody_waits_for():  # still running when the process ends
    work = dist.all_reduce(torch.randn(20_000_000), async_op=True, group=engine_group)
    in_flight.append((work, work.get_future().then(lambda future: future.value())))


atexit.register(start_a_collective_nobody_waits_for)
# a library's long-lived thread pool (torch inductor keeps one): shut down before threads join
pool = ThreadPoolExecutor(max_workers=1)
pool.submit(sum, [1, 2]).result()
marker = Path(sys.argv[1]) / f"atexit-{rank}"
atexit.register(marker.write_text, "ran")

from sft.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_two_workers(tmp_path: Path, *command: str) -> list[subprocess.CompletedProcess[str]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    workers = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path), *command],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    done = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(worker.args, worker.returncode, out, err))
    return done


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        (("plugins", "list", "--json"), 0),
        (("validate", "no-such-config.toml"), 4),  # an error still reaches the launcher as such
    ],
)
def test_a_worker_with_a_collective_in_flight_exits_with_its_commands_code(
    tmp_path, command, exit_code
):
    for rank, done in enumerate(_run_two_workers(tmp_path, *command)):
        assert "terminate called" not in done.stderr, done.stderr[-3000:]
        assert done.returncode == exit_code, done.stderr[-3000:]
        assert (tmp_path / f"atexit-{rank}").read_text() == "ran"  # exit handlers still ran
    if exit_code == 0:
        assert '"name": "sdpa"' in done.stdout  # output flushed before the process ended
