"""Facts about the processes of a run (torchrun / accelerate set them in the environment), and the
distributed engine a config selects. Read from the environment, so they hold before any process
group exists (data preparation runs before one does).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from sft.config.schema import Config

if TYPE_CHECKING:
    from sft.manager import SftPlugins


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that prints and writes the run's files."""
    return rank() == 0


def is_local_main_process() -> bool:
    """Local rank 0: the one process per node that prepares data into the node's cache."""
    return local_rank() == 0


def close_process_group() -> bool:
    """Tear down the process group this process joined (gloo/NCCL threads, DeepSpeed's comm),
    so no collective is left half-way; whether there was one. Local to this process: no
    collective. A launcher's worker that closed one ends through `end_worker_process`."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


def end_worker_process(exit_code: int) -> NoReturn:
    """End a launcher's worker process (one of several, which joined a process group) without
    interpreter teardown.

    `destroy_process_group` stops only the groups nothing else references: the engines keep
    theirs (DeepSpeed's groups, FSDP's device mesh, accelerate's state), and with them gloo's
    worker threads and any collective still in flight (a prefetch nobody waited for). When
    the interpreter then tears down, such a thread that needs the GIL is killed half-way and
    the process aborts ("terminate called without an active exception", exit -6) after its
    work is done, and the launcher reports the whole run as failed. So, once the run's own
    work has returned, the process does what a normal exit does before teardown: thread pools
    shut down and non-daemon threads finish, the exit handlers run, Python's and C's output
    buffers are flushed; then it exits with the run's exit code."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what interpreter exit calls first
    if shutdown is not None:
        shutdown()
    else:  # pragma: no cover - CPython has had threading._shutdown since 3.x
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()  # logging, trackers, temporary folders
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):  # C/C++ libraries' stdio buffers
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(exit_code)


def selected_backends(config: Config, plugins: SftPlugins) -> list[Any]:
    """The distributed engines (`DistributedBackend`) this config selects: none, or one."""
    return [
        backend for _, backend in plugins.distributed_backends().items() if backend.selected(config)
    ]


__all__ = [
    "close_process_group",
    "end_worker_process",
    "is_local_main_process",
    "is_main_process",
    "local_rank",
    "rank",
    "selected_backends",
    "world_size",
]
