"""Reading rows: formats, directories, Hub-style dataset directories, fsspec URLs, bad rows."""

from __future__ import annotations

import json

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from sft.config.schema import DatasetConfig
from sft.data.sources import read_rows
from sft.errors import DataError

ROWS = [{"text": "alpha"}, {"text": "beta"}, {"text": "gamma"}]


def test_jsonl_json_parquet_csv_arrow_read_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("text\nalpha\nbeta\ngamma\n")
    with (
        pa.OSFile(str(tmp_path / "e.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table)
    for name in ("a.jsonl", "b.json", "c.parquet", "d.csv", "e.arrow"):
        raw = read_rows(DatasetConfig(path=str(tmp_path / name)))
        assert raw.rows == ROWS, name
        assert raw.where(2) == (str(tmp_path / name), 3)


def test_directory_with_data_files_glob(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[2:])
    (tmp_path / "notes.md").write_text("ignored")
    assert read_rows(DatasetConfig(path=str(tmp_path))).rows == ROWS
    only = read_rows(DatasetConfig(path=str(tmp_path), data_files="part-1*"))
    assert only.rows == ROWS[2:]


def test_hub_code_path_offline_with_a_dataset_directory(tmp_path):
    # load_dataset(path, name, split, revision) is the Hub path; a saved dataset and a local
    # dataset repository directory go through the same `datasets` calls offline.
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert read_rows(DatasetConfig(path=str(saved))).rows == ROWS
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), repo / "train-00000-of-00001.parquet")
    raw = read_rows(DatasetConfig(path=str(tmp_path / "repo"), split="train"))
    assert raw.rows == ROWS
    with pytest.raises(DataError, match="cannot load dataset"):
        read_rows(DatasetConfig(path="no-such-org/no-such-dataset-xyz"))


def test_fsspec_url_with_storage_options(tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/train.jsonl", "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in ROWS))
    raw = read_rows(DatasetConfig(path="memory://bucket/train.jsonl", storage_options={}))
    assert raw.rows == ROWS
    assert read_rows(DatasetConfig(path="memory://bucket")).rows == ROWS
    write_jsonl(tmp_path / "f.jsonl", ROWS)
    assert read_rows(DatasetConfig(path=f"file://{tmp_path}/f.jsonl")).rows == ROWS


def test_invalid_json_line_is_an_error_naming_file_and_line_or_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(DataError) as error:
        read_rows(DatasetConfig(path=str(path)))
    assert error.value.row == 2 and str(path) in str(error.value)
    raw = read_rows(DatasetConfig(path=str(path)), invalid_rows="skip")
    assert raw.rows == [{"text": "ok"}, {"text": "fine"}]
    assert raw.dropped == {"invalid JSON": 1, "not an object": 1}


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_rows(DatasetConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "data.bin").write_text("x")
    with pytest.raises(DataError, match="ds_type"):
        read_rows(DatasetConfig(path=str(tmp_path / "data.bin")))
    assert read_rows(DatasetConfig(path=str(tmp_path / "data.bin"), ds_type="text")).rows == [
        {"text": "x"}
    ]


def test_fingerprint_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    first = read_rows(DatasetConfig(path=str(path))).fingerprint
    assert read_rows(DatasetConfig(path=str(path))).fingerprint == first
    write_jsonl(path, ROWS[:2])
    assert read_rows(DatasetConfig(path=str(path))).fingerprint != first
