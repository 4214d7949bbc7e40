"""Directories sft writes: never deleting what sft did not create, staging left by killed writers
cleaned up, and disk failures recognised whichever library raised them."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft import fsutil
from sft.fsutil import atomic_directory


def user_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_atomic_directory_keeps_an_existing_directory_and_all_its_files(tmp_path):
    target = tmp_path / "precious"
    (target / "sub").mkdir(parents=True)
    (target / "thesis.txt").write_text("irreplaceable")
    (target / "sub" / "data.bin").write_text("data")
    with atomic_directory(target) as staging:
        (staging / "model.safetensors").write_text("new")
    assert user_files(target) == {"thesis.txt": "irreplaceable", "sub/data.bin": "data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no staging left


def test_atomic_directory_on_the_parent_of_the_working_directory_deletes_nothing(
    tmp_path, monkeypatch
):
    parent = tmp_path / "parent"
    inner = parent / "inner"
    inner.mkdir(parents=True)
    (parent / "notes.txt").write_text("keep")
    (inner / "work.txt").write_text("keep too")
    monkeypatch.chdir(inner)
    with atomic_directory(Path("..")) as staging:
        (staging / "config.json").write_text("{}")
    assert user_files(parent) == {"notes.txt": "keep", "inner/work.txt": "keep too"}
    assert Path.cwd() == inner


def test_atomic_directory_creates_a_missing_target_in_one_piece_and_nothing_on_error(tmp_path):
    with atomic_directory(tmp_path / "new") as staging:
        (staging / "a").write_text("1")
    assert user_files(tmp_path) == {"new/a": "1"}
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "failed") as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("killed midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_a_staging_directory_left_by_a_killed_writer_is_removed_by_the_next_writer(tmp_path):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from sft.fsutil import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'train.arrow').write_bytes(b'x' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "key1")], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    writer.kill()  # SIGKILL: no cleanup runs
    writer.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers, "the killed writer left its staging directory"
    with atomic_directory(tmp_path / "key2") as staging:
        (staging / "complete").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key2"]


def test_staging_of_live_writers_and_recent_foreign_ones_is_kept(tmp_path):
    live = fsutil.staging_path(tmp_path / "a")  # this process: alive
    live.mkdir()
    foreign = tmp_path / ".b.sft-staging-1-0123abcd-some-other-host"
    foreign.mkdir()
    old_foreign = tmp_path / ".c.sft-staging-1-0123abcd-some-other-host"
    old_foreign.mkdir()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_foreign, (day_ago, day_ago))
    lookalike = tmp_path / ".d.tmp123"  # not sft's naming: never touched
    lookalike.mkdir()
    assert fsutil.remove_abandoned_staging(tmp_path) == [old_foreign]
    assert {p.name for p in tmp_path.iterdir()} == {live.name, foreign.name, lookalike.name}


def write_model(files: dict[str, str]):
    def write(staging: Path) -> None:
        for name, text in files.items():
            (staging / name).write_text(text)

    return write


def test_write_directory_overwrite_replaces_only_what_sft_writes(tmp_path):
    target = tmp_path / "merged"
    fsutil.write_directory(target, write_model({"model.safetensors": "v1", "config.json": "{}"}))
    assert fsutil.sft_files(target) == ["config.json", "model.safetensors"]
    (target / "notes.md").write_text("mine")
    # a sharded model this time: the old single file must not shadow the new shards
    fsutil.write_directory(
        target,
        write_model(
            {
                "model-00001-of-00002.safetensors": "a",
                "model-00002-of-00002.safetensors": "b",
                "model.safetensors.index.json": "{}",
                "config.json": '{"v": 2}',
            }
        ),
        overwrite=True,
    )
    assert user_files(target) == {
        fsutil.MARKER: (target / fsutil.MARKER).read_text(),
        "notes.md": "mine",
        "config.json": '{"v": 2}',
        "model-00001-of-00002.safetensors": "a",
        "model-00002-of-00002.safetensors": "b",
        "model.safetensors.index.json": "{}",
    }
    assert json.loads((target / fsutil.MARKER).read_text())["files"] == sorted(
        set(user_files(target)) - {fsutil.MARKER, "notes.md"}
    )


def test_write_directory_into_a_directory_sft_did_not_create_deletes_nothing(tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / "config.json").write_text("user's")
    (target / "README.md").write_text("user's")
    fsutil.write_directory(target, write_model({"config.json": "sft's"}), overwrite=True)
    assert (target / "config.json").read_text() == "sft's"  # the opt-in replaces same names
    assert (target / "README.md").read_text() == "user's"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),
        (Exception("Error while serializing: IoError(os error 28)"), "No space left on device"),
        (RuntimeError("PytorchStreamWriter failed: file write failed"), "is the disk full?"),
    ],
)
def test_storage_failures_are_recognised_whichever_library_raised_them(exc, reason):
    assert reason in (fsutil.storage_failure(exc) or "")


def test_other_errors_are_not_storage_failures():
    assert fsutil.storage_failure(FileNotFoundError(errno.ENOENT, "gone")) is None
    assert fsutil.storage_failure(ValueError("bad value")) is None
