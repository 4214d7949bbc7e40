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


DEEP = "[" * 200_000 + "]" * 200_000  # json.loads: RecursionError, in milliseconds
HUGE_INT = '{"text": ' + "7" * 5000 + "}"  # json.loads: ValueError, over 4300 digits


@pytest.mark.parametrize(
    ("line", "message"),
    [(DEEP, "nested too deeply"), (HUGE_INT, "an integer longer than 4300 digits")],
    ids=["deep", "huge-int"],
)
def test_unreadable_json_line_names_file_and_line_or_is_skipped(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + '\n{"text": "fine"}\n')
    with pytest.raises(DataError) as error:
        read_rows(DatasetConfig(path=str(path)))
    assert (error.value.file, error.value.row) == (str(path), 2)
    assert message in str(error.value)
    raw = read_rows(DatasetConfig(path=str(path)), invalid_rows="skip")
    assert raw.rows == [{"text": "ok"}, {"text": "fine"}]
    assert raw.dropped == {"invalid JSON": 1}


def test_unreadable_json_file_is_an_error_naming_the_file(tmp_path):
    for text, message in ((DEEP, "nested too deeply"), ("[" + HUGE_INT + "]", "4300 digits")):
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(DataError, match=message) as error:
            read_rows(DatasetConfig(path=str(path)), invalid_rows="skip")
        assert error.value.file == str(path)
    (tmp_path / "scalar.json").write_text("5")
    with pytest.raises(DataError, match="must be a list of objects, found int"):
        read_rows(DatasetConfig(path=str(tmp_path / "scalar.json")))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_corrupt_or_truncated_archive_is_an_error_naming_the_file(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    packed = compress(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS * 50))
    corrupt = bytearray(packed)
    corrupt[len(packed) // 2 : len(packed) // 2 + 16] = b"\xff" * 16
    for name, data in (("truncated", packed[: len(packed) // 2]), ("corrupt", bytes(corrupt))):
        path = tmp_path / f"{name}.jsonl{suffix}"
        path.write_bytes(data)
        for policy in ("raise", "skip"):
            with pytest.raises(DataError, match="corrupt or truncated compressed file") as error:
                read_rows(DatasetConfig(path=str(path)), invalid_rows=policy)
            assert error.value.file == str(path)
    good = tmp_path / f"good.jsonl{suffix}"
    good.write_bytes(compress(b'{"text": "alpha"}\n'))
    assert read_rows(DatasetConfig(path=str(good))).rows == ROWS[:1]


def test_non_utf8_line_is_named_by_line_number_or_skipped(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "last"}\n')
    with pytest.raises(DataError) as error:
        read_rows(DatasetConfig(path=str(path)))
    assert (error.value.file, error.value.row) == (str(path), 3)
    assert "not UTF-8 text" in str(error.value) and "iconv" in str(error.value)
    raw = read_rows(DatasetConfig(path=str(path)), invalid_rows="skip")
    assert raw.rows == [{"text": "ok"}, {"text": "fine"}, {"text": "last"}]
    assert [raw.where(i)[1] for i in range(3)] == [1, 2, 4]
    assert raw.dropped == {"not UTF-8": 1}
    whole = tmp_path / "latin.json"
    whole.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"not UTF-8 text \(line 3, byte"):
        read_rows(DatasetConfig(path=str(whole)), invalid_rows="skip")


def test_non_utf8_csv_cell_names_row_and_column(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,n\nhello,1\ncaf\xe9,2\n")
    with pytest.raises(DataError) as error:
        read_rows(DatasetConfig(path=str(path)))
    assert (error.value.row, error.value.field) == (2, "text")
    assert "not UTF-8 text" in str(error.value)
    raw = read_rows(DatasetConfig(path=str(path)), invalid_rows="skip")
    assert raw.rows == [{"text": "hello", "n": 1}] and raw.dropped == {"not UTF-8": 1}


def test_line_separators_inside_json_strings_do_not_split_a_row(tmp_path):
    rows = [{"text": "a\u2028b"}, {"text": "c\x85d\x1ce"}]
    path = write_jsonl(tmp_path / "seps.jsonl", rows)  # ensure_ascii=False leaves them raw
    raw = read_rows(DatasetConfig(path=str(path)))
    assert raw.rows == rows and [raw.where(i)[1] for i in range(2)] == [1, 2]


def test_a_path_that_cannot_be_a_hub_id_is_a_missing_local_file(tmp_path, monkeypatch):
    from sft.data.sources import is_local_path

    monkeypatch.chdir(tmp_path)
    for path in ("data/train.json.gz", "a/b/c", "x.parquet", "~/x", "..x", "a\\b"):
        assert is_local_path(path), path
        with pytest.raises(DataError, match="file not found"):
            read_rows(DatasetConfig(path=path))
    for path in ("tatsu-lab/alpaca", "HuggingFaceH4/ultrachat_200k", "squad", "org/name.v2"):
        assert not is_local_path(path), path
