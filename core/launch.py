"""`sft run CONFIG --nproc-per-node N`: start the processes through torch's own elastic launcher.

The same as `torchrun --nproc-per-node N [--nnodes ...] -m sft run CONFIG ...`: each process is
an ordinary `sft run` that finds its rank in the environment. Nothing here is home-made: the
launcher is `torch.distributed.run`, rendezvous and all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

# sft's launcher options → torchrun's; each takes a value.
LAUNCH_OPTIONS = {
    "--nproc-per-node": "--nproc-per-node",
    "--nnodes": "--nnodes",
    "--node-rank": "--node-rank",
    "--rdzv-endpoint": "--rdzv-endpoint",
    "--rdzv-id": "--rdzv-id",
    "--rdzv-backend": "--rdzv-backend",
    "--master-port": "--master-port",
}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "processes (started with torch's elastic launcher, as torchrun would)"
    )
    group.add_argument(
        "--nproc-per-node", metavar="N", help="processes on this node (one per GPU): e.g. 8"
    )
    group.add_argument("--nnodes", metavar="M", help="nodes (default 1), or MIN:MAX")
    group.add_argument(
        "--node-rank", metavar="R", help="this node's rank with a static rendezvous (0..M-1)"
    )
    group.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address (multi-node: node 0's)"
    )
    group.add_argument("--rdzv-id", metavar="ID", help="a job id shared by all nodes")
    group.add_argument("--rdzv-backend", metavar="NAME", help="static (default) or c10d")
    group.add_argument("--master-port", metavar="PORT", help="port of a single-node run")


def wants_launch(args: argparse.Namespace) -> bool:
    """Whether to start processes: launcher options given, and not already one of them."""
    asked = any(getattr(args, option[2:].replace("-", "_")) for option in LAUNCH_OPTIONS)
    return asked and "LOCAL_RANK" not in os.environ


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line of each process: the same `sft` arguments without the launcher's."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run `sft` with `argv` (less the launcher options) in every process; its exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher: list[str] = []
    for option, torchrun_option in LAUNCH_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value:
            launcher += [torchrun_option, str(value)]
    single_node = str(args.nnodes or "1") in ("1", "1:1")
    if single_node and not args.rdzv_endpoint:
        launcher.append("--standalone")  # a free port and a fresh rendezvous id on this host
    per_node = int(args.nproc_per_node or 1)
    # torchrun gives each process one thread when it starts several; on a CPU-only machine
    # that leaves cores idle. Share them instead (a value the user set is kept).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    parsed = get_args_parser().parse_args([*launcher, "-m", "sft", *child_argv(argv)])
    try:
        run(parsed)
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        return next((code for code in codes if code and code > 0), 1)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0


__all__ = ["add_launch_arguments", "child_argv", "launch", "wants_launch"]
