"""Facts about the processes of a run (torchrun / accelerate set them in the environment), and the
distributed engine a config selects. Read from the environment, so they hold before any process
group exists (data preparation runs before one does).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

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


def close_process_group() -> None:
    """Tear down the process group this process joined (gloo/NCCL threads, DeepSpeed's comm)
    before the interpreter exits: left to interpreter shutdown, a process now and then aborts
    ("terminate called without an active exception") after its work is done, and the launcher
    then reports the whole run as failed. Local to this process: no collective."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def selected_backends(config: Config, plugins: SftPlugins) -> list[Any]:
    """The distributed engines (`DistributedBackend`) this config selects: none, or one."""
    return [
        backend for _, backend in plugins.distributed_backends().items() if backend.selected(config)
    ]


__all__ = [
    "is_local_main_process",
    "is_main_process",
    "local_rank",
    "rank",
    "selected_backends",
    "world_size",
]
