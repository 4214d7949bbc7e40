"""Read the raw rows of one `[[datasets]]` entry: local or remote files, directories, Hub ids.

JSON and JSON Lines are parsed here (not by `datasets`) so a broken line is reported with its
file and line number and can be skipped under `invalid_rows = "skip"`; Parquet, CSV and Arrow
go through pyarrow; Hub ids and dataset directories through `datasets.load_dataset`. Remote
paths (`s3://`, `gs://`, any fsspec URL) are read with fsspec and `storage_options`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from sft.config.schema import DatasetConfig
from sft.errors import DataError

FORMATS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".txt": "text",
}


@attrs.define
class RawRows:
    """The rows of one source, where each came from, and the rows dropped while reading."""

    name: str
    rows: list[dict[str, Any]]
    locations: list[tuple[int, int]]  # (index into files, 1-based row or line number)
    files: list[str]
    fingerprint: str
    dropped: Counter[str] = attrs.field(factory=Counter)

    def where(self, index: int) -> tuple[str, int]:
        file_index, number = self.locations[index]
        return self.files[file_index], number


def _is_url(path: str) -> bool:
    return "://" in path


def _format_of(path: str, ds: DatasetConfig) -> str | None:
    if ds.ds_type:
        return ds.ds_type
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    return FORMATS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None


def _fs(path: str, ds: DatasetConfig) -> Any:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(path, **(ds.storage_options or {}))
    return fs


def _parse_json_lines(text: str, file: str, invalid_rows: str, out: RawRows, index: int) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            _bad_row(
                out,
                invalid_rows,
                "invalid JSON",
                f"invalid JSON: {exc.msg} (column {exc.colno})",
                file,
                number,
            )
            continue
        _append(row, file, number, invalid_rows, out, index)


def _bad_row(
    out: RawRows, invalid_rows: str, reason: str, message: str, file: str, number: int
) -> None:
    """Apply the `invalid_rows` policy to a row that cannot be read: raise, or count by reason."""
    if invalid_rows == "raise":
        raise DataError(
            message,
            file=file,
            row=number,
            hint='fix the row, or set invalid_rows = "skip" to skip and count such rows',
        )
    out.dropped[reason] += 1


def _append(row: Any, file: str, number: int, invalid_rows: str, out: RawRows, index: int) -> None:
    if not isinstance(row, dict):
        message = f"a row must be a JSON object, found {type(row).__name__}"
        _bad_row(out, invalid_rows, "not an object", message, file, number)
        return
    out.rows.append(row)
    out.locations.append((index, number))


def _read_file(
    path: str, fmt: str, ds: DatasetConfig, invalid_rows: str, out: RawRows, hasher: Any
) -> None:
    fs = _fs(path, ds)
    with fs.open(path, "rb", compression="infer") as handle:
        data = handle.read()
    hasher.update(path.encode())
    hasher.update(hashlib.sha256(data).digest())
    if fmt in ("json", "jsonl", "text"):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r})",
                file=path,
                hint="re-encode the file as UTF-8 (e.g. iconv -t UTF-8)",
            ) from None
    index = len(out.files)
    out.files.append(path)
    if fmt == "jsonl":
        _parse_json_lines(data.decode("utf-8"), path, invalid_rows, out, index)
    elif fmt == "json":
        text = data.decode("utf-8")
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            if "\n{" in text.strip()[:200000] and text.lstrip().startswith("{"):
                _parse_json_lines(text, path, invalid_rows, out, index)  # JSON Lines named .json
                return
            raise DataError(
                f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", file=path
            ) from None
        if isinstance(parsed, dict):
            lists = [v for v in parsed.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(
                    "a .json dataset must be a list of objects (or an object holding one list)",
                    file=path,
                )
            parsed = lists[0]
        for number, row in enumerate(parsed, start=1):
            _append(row, path, number, invalid_rows, out, index)
    elif fmt in ("parquet", "csv", "arrow"):
        table = _arrow_table(io.BytesIO(data), fmt, path)
        for number, row in enumerate(table.to_pylist(), start=1):
            _append(row, path, number, invalid_rows, out, index)
    elif fmt == "text":
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if line.strip():
                _append({"text": line}, path, number, invalid_rows, out, index)
    else:  # pragma: no cover - guarded by the caller
        raise DataError(f"unsupported format {fmt!r}", file=path)


def _arrow_table(handle: io.BytesIO, fmt: str, path: str) -> Any:
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(handle)
        if fmt == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(handle)
        try:
            return pa.ipc.open_file(handle).read_all()
        except pa.ArrowInvalid:
            handle.seek(0)
            return pa.ipc.open_stream(handle).read_all()
    except pa.ArrowException as exc:
        raise DataError(f"cannot read {fmt} file: {exc}", file=path) from None


def _list_files(path: str, ds: DatasetConfig) -> list[str]:
    fs = _fs(path, ds)
    patterns = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files or [])
    base = path.rstrip("/")
    if patterns:
        files: list[str] = []
        for pattern in patterns:
            found = sorted(fs.glob(f"{base}/{pattern}"))
            if not found:
                raise DataError(f"data_files pattern {pattern!r} matches no file", file=path)
            files.extend(found)
    else:
        # Plain .txt files are data only when asked for (ds_type = "text"): a README or notes
        # beside the data must not become rows.
        files = sorted(
            f
            for f in fs.find(base)
            if _format_of(f, ds) is not None and (ds.ds_type == "text" or not f.endswith(".txt"))
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if _is_url(path) and protocol not in ("file", "local"):
        files = [f if "://" in f else f"{protocol}://{f}" for f in files]
    return files


def read_rows(
    ds: DatasetConfig, invalid_rows: str = "raise", base_dir: Path | None = None
) -> RawRows:
    """Read every row of one dataset entry."""
    path = ds.path
    local = Path(path).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    out = RawRows(name=path, rows=[], locations=[], files=[], fingerprint="")
    hasher = hashlib.sha256()
    if _is_url(path) or local.exists():
        target = path if _is_url(path) else str(local)
        fs = _fs(target, ds)
        if fs.isdir(target):
            if not _is_url(path) and _looks_like_saved_dataset(local):
                return _from_datasets(ds, str(local), out, invalid_rows)
            files = _list_files(target, ds)
            if not files and not _is_url(path):
                return _from_datasets(ds, str(local), out, invalid_rows)
            if not files:
                raise DataError("no dataset files found in the directory", file=path)
        else:
            if not fs.exists(target):
                raise DataError("file not found", file=path)
            files = [target]
        for file in files:
            fmt = _format_of(file, ds)
            if fmt is None:
                raise DataError(
                    "cannot tell the file format from its name",
                    file=file,
                    hint="set ds_type = json | jsonl | parquet | csv | arrow | text",
                )
            _read_file(file, fmt, ds, invalid_rows, out, hasher)
        out.fingerprint = hasher.hexdigest()
        return out
    if path.startswith((".", "/", "~")) or Path(path).suffix in FORMATS:
        raise DataError(
            "file not found",
            file=path,
            hint="check the path (relative to the config file or the working directory)",
        )
    return _from_datasets(ds, path, out, invalid_rows)


def _looks_like_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() and (path / "state.json").exists()


def _from_datasets(ds: DatasetConfig, path: str, out: RawRows, invalid_rows: str) -> RawRows:
    """A Hub dataset id or a dataset directory, through `datasets`."""
    import datasets

    try:
        if Path(path).is_dir() and _looks_like_saved_dataset(Path(path)):
            loaded: Any = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(
                path,
                name=ds.name,
                split=ds.split,
                revision=ds.revision,
                data_files=list(ds.data_files)
                if isinstance(ds.data_files, tuple)
                else ds.data_files,
                storage_options=ds.storage_options,
            )
    except Exception as exc:  # datasets raises many types; the user needs the source and cause
        raise DataError(
            f"cannot load dataset: {type(exc).__name__}: {exc}",
            file=path,
            hint="check the Hub id / name / split / revision, network access and credentials",
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if ds.split not in loaded:
            raise DataError(f"no split {ds.split!r}; available: {', '.join(loaded)}", file=path)
        loaded = loaded[ds.split]
    out.files.append(path)
    for number, row in enumerate(loaded.to_list(), start=1):
        _append(row, path, number, invalid_rows, out, 0)
    key = f"{path}|{ds.name}|{ds.split}|{ds.revision}|{getattr(loaded, '_fingerprint', '')}"
    out.fingerprint = hashlib.sha256(key.encode()).hexdigest()
    return out
