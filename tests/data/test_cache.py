"""The prepared-data cache as users meet it: `~` paths, several runs at once, a full disk, a
damaged entry."""

from __future__ import annotations

import errno
import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
from conftest import tiny_rows, write_jsonl

from sft.cli import main
from sft.data.pipeline import Prepared, _features, _load_cached, _save_cached
from sft.data.summary import Summary


def make_project(root: Path, prepared: str) -> Path:
    """A tokenizer, chat data and a config whose cache is `prepared`; returns the config."""
    from sft.testing import build_tokenizer

    build_tokenizer(
        special_tokens=["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>"
    ).save_pretrained(root / "tok")
    write_jsonl(root / "chat.jsonl", tiny_rows(6))
    config = root / "config.toml"
    config.write_text(
        f'base_model = "{root / "tok"}"\nchat_template = "chatml"\n'
        f'dataset_prepared_path = "{prepared}"\n'
        f'[[datasets]]\npath = "{root / "chat.jsonl"}"\ntype = "chat_template"\n'
    )
    return config


def entries(prepared: Path) -> list[Path]:
    """The cache entries of a dataset_prepared_path (without the source-alias index)."""
    from sft.data.pipeline import ALIASES

    return [p for p in prepared.iterdir() if p.name != ALIASES]


def test_a_prepared_path_under_home_is_one_cache_that_the_next_run_loads(
    tmp_path, monkeypatch, plugins, capsys
):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    config = make_project(tmp_path, "~/sft-prepared")
    assert main(["preprocess", str(config)]) == 0
    assert "written to" in capsys.readouterr().out
    assert main(["preprocess", str(config)]) == 0
    assert "loaded from" in capsys.readouterr().out
    assert not (work / "~").exists()  # no directory literally named ~ (an `rm -rf ~` trap)
    (entry,) = entries(home / "sft-prepared")
    assert sorted(p.name for p in entry.iterdir()) == ["complete", "summary.json", "train.arrow"]


def test_a_full_disk_is_a_data_error_naming_the_cache_and_leaves_nothing(
    tmp_path, plugins, monkeypatch, capsys
):

    from datasets.arrow_writer import ArrowWriter

    real_write = ArrowWriter.write_table

    def full_disk(self, table, *args, **kwargs):
        real_write(self, table, *args, **kwargs)  # partly written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ArrowWriter, "write_table", full_disk)
    config = make_project(tmp_path, str(tmp_path / "prepared"))
    assert main(["preprocess", str(config)]) == 5
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(tmp_path / "prepared") in err
    assert "Traceback" not in err
    assert list((tmp_path / "prepared").iterdir()) == []  # no partial staging directory


def test_a_damaged_cache_entry_is_a_data_error_saying_what_to_delete(tmp_path, plugins, capsys):
    config = make_project(tmp_path, str(tmp_path / "prepared"))
    assert main(["preprocess", str(config)]) == 0
    (entry,) = entries(tmp_path / "prepared")
    (entry / "train.arrow").unlink()
    capsys.readouterr()
    assert main(["preprocess", str(config)]) == 5
    err = capsys.readouterr().err
    assert "damaged" in err and str(entry) in err and "delete" in err
    assert "Traceback" not in err


# -- several processes on one cache entry ---------------------------------------------------------

SECONDS = 3.0


def _prepared() -> Prepared:
    import datasets

    ids = [[1, 2, 3, i] for i in range(50)]
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}, features=_features())
    return Prepared(train=train, eval=None, summary=Summary(train_samples=50))


def _writer(cache_dir: str, results: multiprocessing.Queue) -> None:
    prepared, errors, writes = _prepared(), [], 0
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        try:
            _save_cached(prepared, Path(cache_dir))
            writes += 1
        except Exception:
            errors.append(traceback.format_exc(limit=3))
    results.put(("writer", writes, errors[:3], len(errors)))


def _reader(cache_dir: str, results: multiprocessing.Queue) -> None:
    errors, loads = [], 0
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        if not (Path(cache_dir) / "complete").exists():
            continue
        try:
            assert len(_load_cached(Path(cache_dir)).train) == 50
            loads += 1
        except Exception:
            errors.append(traceback.format_exc(limit=3))
    results.put(("reader", loads, errors[:3], len(errors)))


def test_two_writers_and_a_reader_on_one_cache_entry_never_fail(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    cache_dir = str(tmp_path / "prepared" / "0123abcd")
    workers = [
        context.Process(target=_writer, args=(cache_dir, results)),
        context.Process(target=_writer, args=(cache_dir, results)),
        context.Process(target=_reader, args=(cache_dir, results)),
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    for kind, count, errors, failures in reports:
        assert failures == 0, f"{kind}: {failures} failures, e.g.\n" + "\n".join(errors)
        assert count > 0, kind
    assert len(_load_cached(Path(cache_dir)).train) == 50
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["0123abcd"]  # no leftovers


@pytest.mark.parametrize("eval_split", [False, True])
def test_the_cache_round_trips(tmp_path, eval_split):
    prepared = _prepared()
    if eval_split:
        prepared = Prepared(train=prepared.train, eval=prepared.train, summary=prepared.summary)
    _save_cached(prepared, tmp_path / "key")
    loaded = _load_cached(tmp_path / "key")
    assert loaded.from_cache and len(loaded.train) == 50
    assert (loaded.eval is not None) == eval_split


def test_a_cache_hit_reads_no_data_and_an_edited_file_is_a_miss(tmp_path, monkeypatch, plugins):
    import sft.data.pipeline as pipeline
    from sft.config import load_config

    config_path = make_project(tmp_path, str(tmp_path / "prepared"))
    config = load_config(config_path)
    first = pipeline.prepare_datasets(config, show_progress=False)
    assert not first.from_cache

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the data")

    monkeypatch.setattr(pipeline, "read_rows", no_reading)
    again = pipeline.prepare_datasets(config, show_progress=False)
    assert again.from_cache and again.cache_dir == first.cache_dir
    monkeypatch.undo()

    data = tmp_path / "chat.jsonl"
    data.write_text(data.read_text().replace("plus", "and"))  # same size class, new content
    edited = pipeline.prepare_datasets(config, show_progress=False)
    assert not edited.from_cache and edited.cache_dir != first.cache_dir
