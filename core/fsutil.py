"""Directories written atomically: filled under a temporary name, then renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes `target` in one rename.

    A crash leaves only the staging directory (never a half-written `target`). With
    `replace = False` an existing `target` (written meanwhile by another process) is kept.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(target)
    staging.replace(target)
    _fsync_directory(target.parent)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
