"""What a run may write into its `output_dir`, decided before anything slow.

sft never deletes or overwrites what it did not write. A directory sft creates for a run holds a
marker (`.sft-output`, see `sft.fsutil`) that records the files of the run's result once it is
saved. A fresh run (one that does not resume):

- into a missing or empty directory: creates and marks it;
- into a directory of an earlier sft run that kept nothing (stopped before its first
  checkpoint): starts a fresh `metrics.jsonl` there;
- into a directory holding an earlier run's checkpoints: refused (resume it, or delete them);
- into a directory holding an earlier sft run's result, or files sft did not write: refused,
  unless `overwrite_output_dir = true`; then sft's files replace the files of the same name,
  the earlier result's files this run does not rewrite are removed once this run has saved,
  and everything else is kept.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from sft.config.schema import Config
from sft.distributed import is_main_process
from sft.errors import ConfigError, ModelError, Problem
from sft.fsutil import MARKER, mark_directory, replace_sft_files, sft_files
from sft.save import RESOLVED_CONFIG

METRICS = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint. Checkpoints appear by an atomic rename, so each one is complete."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(found)[1] if found else None


def refuse_stale_checkpoints(output_dir: Path) -> None:
    """A fresh run must not mix with an earlier run's checkpoints (rotation would delete its own)."""
    found = latest_checkpoint(output_dir)
    if found is not None:
        raise ModelError(
            f"{output_dir} holds checkpoints of an earlier run ({found.name}) and this run does not resume\n"
            "  fix: set auto_resume_from_checkpoints = true to continue it, or use another output_dir, "
            "or delete the old checkpoint-* directories"
        )


@attrs.define
class OutputDir:
    """The output directory a run has claimed; `record_result` marks the files it saved."""

    path: Path
    previous: list[str]  # the files of an earlier result, replaced by this run's
    before: dict[str, tuple[int, int, int]]  # name → (inode, size, mtime) of each file at the start

    def record_result(self) -> None:
        """Record the files this run wrote (new or changed since the start) in the marker, and
        remove the earlier result's files this run did not rewrite. Main process only."""
        if not is_main_process():
            return
        after = _files(self.path)
        written = [name for name, stat in after.items() if self.before.get(name) != stat]
        replace_sft_files(self.path, written, self.previous)


def _files(directory: Path) -> dict[str, tuple[int, int, int]]:
    found = {}
    for entry in directory.iterdir() if directory.is_dir() else ():
        if entry.name == MARKER or not entry.is_file():
            continue
        stat = entry.stat()
        found[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


def _problem(config: Config, message: str, hint: str) -> ConfigError:
    return ConfigError([Problem("output_dir", message, hint=hint)], config.source)


def claim_output_dir(config: Config, resuming: bool) -> OutputDir:
    """Check that this run may write into `output_dir` (see the module doc), then create and
    mark it. Raises before any data is prepared or any model loaded."""
    path = Path(config.output_dir)
    if not is_main_process():  # rank 0 decides (and creates); the others follow or are stopped
        return OutputDir(path, [], {})
    if path.exists() and not path.is_dir():
        raise _problem(config, f"{path} is a file", "set output_dir to a directory path")
    recorded = sft_files(path)  # None: not created by sft
    continuing = resuming and latest_checkpoint(path) is not None
    if not continuing:
        if not resuming:
            refuse_stale_checkpoints(path)
        others = sorted(p.name for p in path.iterdir() if p.name != MARKER) if path.is_dir() else []
        finished = recorded is not None and (path / RESOLVED_CONFIG).exists()
        if others and (recorded is None or finished) and not config.overwrite_output_dir:
            listing = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            what = (
                "the result of an earlier sft run"
                if recorded is not None
                else "files sft did not write"
            )
            raise _problem(
                config,
                f"{path} already holds {what} ({listing})",
                "choose another output_dir, or set overwrite_output_dir = true to write there: "
                "sft's files (model, tokenizer, README.md, sft_config.yaml, metrics.jsonl, "
                "loss.png) replace those of the same name and an earlier sft result's, other "
                "files are kept",
            )
        if is_main_process() and (path / METRICS).is_file():
            (path / METRICS).unlink()  # a fresh run starts a fresh log
    path.mkdir(parents=True, exist_ok=True)
    if recorded is None:
        mark_directory(path)
    lock_output_dir(path)
    return OutputDir(path, recorded or [], _files(path))


_held: dict[Path, int] = {}  # output_dir → its open marker file, locked until this process ends


def lock_output_dir(path: Path) -> None:
    """One run at a time writes into an output_dir: its checkpoints, staging and metrics would
    mix. The lock is an OS lock on the directory's marker file, released when the process
    ends, however it ends."""
    import fcntl
    import os

    key = path.resolve()
    if key in _held:
        return
    handle = os.open(path / MARKER, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        raise ModelError(
            f"another sft run is writing to {path}\n"
            "  fix: wait for it to finish, or use another output_dir"
        ) from None
    _held[key] = handle


def release_output_dir(path: Path) -> None:
    """Let another run use `path` (the Python API's runs end without the process ending)."""
    import os

    handle = _held.pop(path.resolve(), None)
    if handle is not None:
        os.close(handle)  # closing the file releases its lock


__all__ = [
    "METRICS",
    "OutputDir",
    "claim_output_dir",
    "lock_output_dir",
    "refuse_stale_checkpoints",
    "release_output_dir",
]
