"""Directories sft writes: filled under a staging name, renamed into place, marked as sft's.

The rule: sft never deletes or replaces a directory it did not create, and never deletes a file
it did not write. A directory sft creates holds a small marker file (`.sft-output`) listing the
files of sft's last complete write there; only those are ever replaced or removed later.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sft

MARKER = ".sft-output"

# A staging directory of a writer that was killed is removed by the next writer in the same
# folder: at once when it belonged to a process of this machine that is gone, after a day when it
# came from another machine (a shared disk), whose processes cannot be checked from here.
ABANDONED_AFTER_S = 24 * 3600
_STAGING = re.compile(r"^\..+\.sft-staging-(?P<pid>\d+)-[0-9a-f]{8}-(?P<host>.+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", socket.gethostname()) or "localhost"


def staging_path(target: Path) -> Path:
    """A fresh hidden sibling of `target` (same file system, so the final rename is atomic)."""
    name = f".{target.name}.sft-staging-{os.getpid()}-{secrets.token_hex(4)}-{_host()}"
    return target.with_name(name)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_abandoned_staging(parent: Path) -> list[Path]:
    """Remove the staging directories killed writers left in `parent`; return them."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    removed = []
    now, host = time.time(), _host()
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue  # removed meanwhile by another writer
        here = match["host"] == host
        if (here and not _process_alive(int(match["pid"]))) or age > ABANDONED_AFTER_S:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes `target` in one rename.

    An existing `target` is never deleted or replaced (a rename only ever lands on a missing or
    empty directory): when another process finished first, its copy is kept and this one is
    discarded — the first complete copy wins. An error leaves no `target` and no staging
    directory; a kill leaves a staging directory that the next writer here removes.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target.parent)
    staging = staging_path(target)
    staging.mkdir()
    try:
        yield staging
        _rename_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful rename


def _rename_into_place(staging: Path, target: Path) -> bool:
    """Rename `staging` to `target` unless a non-empty `target` exists (then keep it: False)."""
    try:
        staging.rename(target)  # lands only on a missing or empty directory
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
            raise
        return False
    _fsync_directory(target.parent)
    return True


def is_empty_directory(path: Path) -> bool:
    """A directory with nothing in it but sft's marker."""
    return path.is_dir() and all(entry.name == MARKER for entry in path.iterdir())


def sft_files(directory: Path) -> list[str] | None:
    """The files sft's last write recorded in `directory`; None when sft did not create it."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return []
    return [
        f for f in files if isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")
    ]


def mark_directory(directory: Path, files: Iterable[str] = ()) -> None:
    """Mark `directory` as created by sft, recording the files of its last complete write."""
    data = {"written_by": f"sft {sft.__version__}", "files": sorted(set(files) - {MARKER})}
    (directory / MARKER).write_text(json.dumps(data, indent=1) + "\n")


def replace_sft_files(directory: Path, written: Iterable[str], previous: Iterable[str]) -> None:
    """After a new complete write into `directory`: remove the files the `previous` sft write
    recorded that this one did not rewrite (a stale shard must not shadow the new model), and
    record the new ones. Files sft never recorded are left alone."""
    written = set(written)
    for name in set(previous) - written - {MARKER}:
        stale = directory / name
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    mark_directory(directory, written)


def write_directory(target: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Write sft's files into `target` through `write(staging)`, and mark it as sft's.

    A missing or empty `target` appears complete in one rename. Into a non-empty `target` (only
    with `overwrite`; callers refuse it otherwise) each file replaces the file of the same name,
    the files of sft's previous write there that this one did not rewrite are removed, and
    nothing else is touched.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target.parent)
    merge = overwrite and target.is_dir() and not is_empty_directory(target)
    previous = (sft_files(target) or []) if merge else []
    staging = staging_path(target)
    staging.mkdir()
    try:
        write(staging)
        written = [p.name for p in staging.iterdir()]
        if not merge:
            mark_directory(staging, written)
            if target.is_dir():  # empty but for a marker: the rename lands on it
                (target / MARKER).unlink(missing_ok=True)
            if not _rename_into_place(staging, target):
                raise FileExistsError(
                    errno.EEXIST, "written meanwhile by another process", str(target)
                )
            return
        for name in written:
            if (target / name).is_dir() and not (target / name).is_symlink():
                raise IsADirectoryError(
                    errno.EISDIR, "a directory is in the way", str(target / name)
                )
        for name in written:
            (staging / name).replace(target / name)  # one file at a time, each atomic
        replace_sft_files(target, written, previous)
        _fsync_directory(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
# Libraries that write through their own I/O (safetensors, pyarrow, torch.save) do not always
# raise an OSError with an errno; their messages still say what happened.
_STORAGE_MESSAGES = {
    "No space left on device": "No space left on device",
    "os error 28": "No space left on device",
    "Disk quota exceeded": "Disk quota exceeded",
    "os error 122": "Disk quota exceeded",
    "Read-only file system": "Read-only file system",
    "file write failed": "a file write failed (is the disk full?)",
}


def storage_failure(exc: BaseException) -> str | None:
    """Why writing to disk failed (disk full, quota, read-only, no permission), whichever library
    raised `exc`; None when `exc` is not such a failure."""
    number = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and number in _STORAGE_ERRNOS:
        return os.strerror(number)
    text = str(exc)
    for needle, reason in _STORAGE_MESSAGES.items():
        if needle in text:
            return reason
    return None
