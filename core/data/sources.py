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
import lzma
import re
import sys
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
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
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# A Hub dataset id: `name` or `namespace/name`, word characters, `-` and `.` (huggingface_hub's
# repo id rule). A path that cannot be one is local, and a missing local file is an error.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


@attrs.define
class RawRows:
    """The rows of one source, where each came from, and the rows dropped while reading."""

    name: str
    rows: list[dict[str, Any]]
    locations: list[tuple[int, int]]  # (index into files, 1-based row or line number)
    files: list[str]
    fingerprint: str
    dropped: Counter[str] = attrs.field(factory=Counter)

    def shard(self, count: int, index: int) -> RawRows:
        """The `index`-th of `count` contiguous pieces (as `datasets.Dataset.shard` cuts)."""
        size, extra = divmod(len(self.rows), count)
        start = size * index + min(index, extra)
        stop = start + size + (1 if index < extra else 0)
        return attrs.evolve(
            self,
            rows=self.rows[start:stop],
            locations=self.locations[start:stop],
            fingerprint=f"{self.fingerprint}|shard {index}/{count}",
        )

    def where(self, index: int) -> tuple[str, int]:
        file_index, number = self.locations[index]
        return self.files[file_index], number

    @property
    def count(self) -> int:
        return len(self.rows)

    def located(self) -> Iterator[tuple[dict[str, Any], str, int]]:
        """Every row with its file and 1-based row (or line) number."""
        for row, (file_index, number) in zip(self.rows, self.locations, strict=True):
            yield row, self.files[file_index], number


@attrs.define
class RowPlaces:
    """Where each row of a source read lazily came from, a few bytes per row (its file and
    1-based row or line number): what a row error names, without holding the rows."""

    name: str
    files: list[str] = attrs.field(factory=list)
    file_of_row: array[int] = attrs.field(factory=lambda: array("i"))
    number_of_row: array[int] = attrs.field(factory=lambda: array("q"))
    _file_ids: dict[str, int] = attrs.field(factory=dict)

    def add(self, file: str, number: int) -> None:
        file_id = self._file_ids.get(file)
        if file_id is None:
            file_id = self._file_ids[file] = len(self.files)
            self.files.append(file)
        self.file_of_row.append(file_id)
        self.number_of_row.append(number)

    def where(self, index: int) -> tuple[str, int]:
        return self.files[self.file_of_row[index]], self.number_of_row[index]

    @property
    def count(self) -> int:
        return len(self.number_of_row)


def _is_url(path: str) -> bool:
    return "://" in path


def is_local_path(path: str) -> bool:
    """Whether a dataset `path` that is not a URL must be a local file or directory.

    A string that cannot be a Hub dataset id is local: more than one `/`, a data or compressed
    file extension, a leading `.`, `/` or `~`, a backslash, `..` or `--`. A Hub-id-shaped string
    (`org/name`, `name`) is a Hub id unless it exists locally (decided by the caller).
    """
    name = path.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return (
        not _HUB_ID.fullmatch(path)
        or ".." in path
        or "--" in path
        or path.lower().endswith(COMPRESSED)
        or Path(name).suffix in FORMATS
    )


def _format_of(path: str, ds: DatasetConfig) -> str | None:
    if ds.ds_type:
        return ds.ds_type
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return FORMATS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None


def _fs(path: str, ds: DatasetConfig) -> Any:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(path, **(ds.storage_options or {}))
    return fs


def _parse_json_lines(text: str, file: str, invalid_rows: str, out: RawRows, index: int) -> None:
    # Lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085 and other
    # characters that JSON writers leave raw inside strings (json.dumps(ensure_ascii=False)).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # see _json_problem
            _bad_row(out, invalid_rows, "invalid JSON", _json_problem(exc), file, number)
            continue
        _append(row, file, number, invalid_rows, out, index)


def _json_problem(exc: ValueError | RecursionError, whole_file: bool = False) -> str:
    """Why `json.loads` refused a text: a syntax error (`JSONDecodeError`), an integer too long
    to convert (`ValueError`), or nesting deeper than Python's recursion limit."""
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply to read"
    if isinstance(exc, json.JSONDecodeError):
        where = f"line {exc.lineno}, column {exc.colno}" if whole_file else f"column {exc.colno}"
        return f"invalid JSON: {exc.msg} ({where})"
    if "integer string conversion" in str(exc):
        return f"invalid JSON: an integer longer than {sys.get_int_max_str_digits()} digits"
    return f"invalid JSON: {exc}"


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


def _read_bytes(path: str, ds: DatasetConfig) -> bytes:
    """The file's bytes, decompressed by its suffix; an unreadable file is a `DataError`."""
    compressed = path.lower().endswith(COMPRESSED)
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    if path.lower().endswith(".zst"):
        try:
            import zstandard

            errors += (zstandard.ZstdError,)
        except ImportError:
            pass  # fsspec says that zstandard is needed
    try:
        with _fs(path, ds).open(path, "rb", compression="infer") as handle:
            data: bytes = handle.read()
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except errors as exc:  # a truncated or corrupt archive fails inside the decompressing read
        what = "corrupt or truncated compressed file" if compressed else "cannot read the file"
        raise DataError(
            f"{what}: {type(exc).__name__}: {exc}",
            file=path,
            hint="check the file (e.g. gzip -t), or download or copy it again"
            if compressed
            else None,
        ) from None
    return data


def _decode(data: bytes, fmt: str, path: str, invalid_rows: str, out: RawRows) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are an error naming their line.

    In line-based files (JSON Lines, text) such a line is a bad row, skipped and counted under
    `invalid_rows = "skip"`; in a .json file they spoil the whole file.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        first = exc
    by_line = fmt in ("jsonl", "text")
    if by_line and invalid_rows == "skip":
        lines = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.dropped["not UTF-8"] += 1
                lines.append("")  # keeps the line numbers of the lines after it
        return "\n".join(lines)
    line = data.count(b"\n", 0, first.start) + 1
    found = data[first.start : first.start + 1]
    raise DataError(
        f"not UTF-8 text ({'' if by_line else f'line {line}, '}byte {first.start}: {found!r})",
        file=path,
        row=line if by_line else None,
        hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t UTF-8)"
        + (', or set invalid_rows = "skip" to skip and count such lines' if by_line else ""),
    )


def _read_file(
    path: str, fmt: str, ds: DatasetConfig, invalid_rows: str, out: RawRows, hasher: Any
) -> None:
    data = _read_bytes(path, ds)
    hasher.update(path.encode())
    hasher.update(hashlib.sha256(data).digest())
    text = _decode(data, fmt, path, invalid_rows, out) if fmt in ("json", "jsonl", "text") else ""
    index = len(out.files)
    out.files.append(path)
    if fmt == "jsonl":
        _parse_json_lines(text, path, invalid_rows, out, index)
    elif fmt == "json":
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as exc:
            if (
                isinstance(exc, json.JSONDecodeError)
                and "\n{" in text.strip()[:200000]
                and text.lstrip().startswith("{")
            ):
                _parse_json_lines(text, path, invalid_rows, out, index)  # JSON Lines named .json
                return
            raise DataError(_json_problem(exc, whole_file=True), file=path) from None
        if isinstance(parsed, dict):
            lists = [v for v in parsed.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(
                    "a .json dataset must be a list of objects (or an object holding one list)",
                    file=path,
                )
            parsed = lists[0]
        if not isinstance(parsed, list):
            raise DataError(
                f"a .json dataset must be a list of objects, found {type(parsed).__name__}",
                file=path,
            )
        for number, row in enumerate(parsed, start=1):
            _append(row, path, number, invalid_rows, out, index)
    elif fmt in ("parquet", "csv", "arrow"):
        table = _arrow_table(io.BytesIO(data), fmt, path)
        # pyarrow reads a CSV column holding bytes that are not UTF-8 as binary: decode here so
        # the row is named, rather than failing later on "should be str, found bytes".
        binary = [f.name for f in table.schema if fmt == "csv" and str(f.type) == "binary"]
        for number, row in enumerate(table.to_pylist(), start=1):
            if binary and not _decode_csv_row(row, binary, path, number, invalid_rows, out):
                continue
            _append(row, path, number, invalid_rows, out, index)
    elif fmt == "text":
        for number, line in enumerate(text.split("\n"), start=1):  # line numbers as in _decode
            line = line.removesuffix("\r")
            if line.strip():
                _append({"text": line}, path, number, invalid_rows, out, index)
    else:  # pragma: no cover - guarded by the caller
        raise DataError(f"unsupported format {fmt!r}", file=path)


def _decode_csv_row(
    row: dict[str, Any], columns: list[str], path: str, number: int, invalid_rows: str, out: RawRows
) -> bool:
    """Decode a CSV row's binary cells as UTF-8 in place; False when the row was dropped."""
    for name in columns:
        value = row[name]
        if not isinstance(value, bytes):
            continue
        try:
            row[name] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            if invalid_rows == "raise":
                raise DataError(
                    f"not UTF-8 text (byte {exc.start}: {value[exc.start : exc.start + 1]!r})",
                    file=path,
                    row=number,
                    field=name,
                    hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t UTF-8), "
                    'or set invalid_rows = "skip" to skip and count such rows',
                ) from None
            out.dropped["not UTF-8"] += 1
            return False
    return True


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


@attrs.frozen
class Located:
    """Where one dataset entry's rows come from: `files` with their formats, or `datasets`
    (a saved dataset, a local dataset repository or a Hub id, read by the datasets library)."""

    files: tuple[tuple[str, str], ...] = ()
    datasets: str | None = None


def locate(ds: DatasetConfig) -> Located:
    """Resolve a dataset entry's path (relative paths from the working directory)."""
    path = ds.path
    local = Path(path).expanduser()
    if _is_url(path) or local.exists():
        target = path if _is_url(path) else str(local)
        fs = _fs(target, ds)
        if fs.isdir(target):
            if not _is_url(path) and _looks_like_saved_dataset(local):
                return Located(datasets=str(local))
            files = _list_files(target, ds)
            if not files and not _is_url(path):  # a local dataset repository
                return Located(datasets=str(local))
            if not files:
                raise DataError("no dataset files found in the directory", file=path)
        else:
            if not fs.exists(target):
                raise DataError("file not found", file=path)
            files = [target]
        formats = []
        for file in files:
            fmt = _format_of(file, ds)
            if fmt is None:
                raise DataError(
                    "cannot tell the file format from its name",
                    file=file,
                    hint="set ds_type = json | jsonl | parquet | csv | arrow | text",
                )
            formats.append((file, fmt))
        return Located(files=tuple(formats))
    if is_local_path(path):
        raise DataError(
            "file not found",
            file=path,
            hint=f"check the path; a relative path is read from the working directory ({Path.cwd()})",
        )
    return Located(datasets=path)


def read_rows(ds: DatasetConfig, invalid_rows: str = "raise") -> RawRows:
    """Read every row of one dataset entry."""
    out = RawRows(name=ds.path, rows=[], locations=[], files=[], fingerprint="")
    source = locate(ds)
    if source.datasets is not None:
        return _from_datasets(ds, source.datasets, out, invalid_rows)
    hasher = hashlib.sha256()
    for file, fmt in source.files:
        _read_file(file, fmt, ds, invalid_rows, out, hasher)
    out.fingerprint = hasher.hexdigest()
    return out


def quick_fingerprint(ds: DatasetConfig) -> str | None:
    """A fingerprint of the source from metadata only (no row is read), or None when there is
    no trustworthy one (then the content is hashed while reading).

    Local and fsspec files: path, size and modification time (or ETag) of every file the entry
    reads. A saved dataset: its `state.json` (which holds the datasets fingerprint). A Hub
    dataset: the commit the revision resolves to (asked of the Hub, or read from the local
    Hub cache when offline). Used for the prepared-data cache key, so that a cache hit reads
    no data at all.
    """
    path = ds.path
    local = Path(path).expanduser()
    parts = [f"{ds.name}|{ds.split}|{ds.revision}|{ds.data_files}|{ds.ds_type}"]
    try:
        if _is_url(path) or local.exists():
            target = path if _is_url(path) else str(local)
            fs = _fs(target, ds)
            if fs.isdir(target):
                if not _is_url(path) and _looks_like_saved_dataset(local):
                    parts.append((local / "state.json").read_text())
                    return _digest(parts)
                files = _list_files(target, ds)
                if not files:
                    return None
            else:
                files = [target]
            for file in files:
                info = fs.info(file)
                stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag")
                stamp = stamp or info.get("etag") or info.get("md5Hash")
                if stamp is None or info.get("size") is None:
                    return None
                parts.append(f"{file}|{info['size']}|{stamp}")
            if not _is_url(path):  # nanosecond mtimes: a rewrite within a second still shows
                parts += [f"{file}|{Path(file).stat().st_mtime_ns}" for file in files]
            return _digest(parts)
        if is_local_path(path):
            return None  # reading says "file not found"
        commit = _hub_commit(path, ds.revision)
        return _digest([*parts, f"hub|{path}|{commit}"]) if commit else None
    except (OSError, ValueError, DataError):
        return None


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a Hub dataset revision points to: a full commit id as given, the local Hub
    cache's record of it, or the Hub's answer (online only)."""
    import os
    import re

    wanted = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", wanted):
        return wanted
    try:
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / wanted
    if ref.is_file():
        return ref.read_text().strip() or None
    if HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=wanted, timeout=10).sha
    except Exception:  # no network, no access: fall back to reading the data
        return None


def _looks_like_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() and (path / "state.json").exists()


def load_datasets_source(ds: DatasetConfig, path: str, streaming: bool = False) -> Any:
    """A Hub dataset id, a local dataset repository or a `save_to_disk` directory, opened by
    `datasets` (a saved dataset is memory-mapped; `streaming` applies to the others)."""
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
                **({"streaming": True} if streaming else {}),
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
    return loaded


def _from_datasets(ds: DatasetConfig, path: str, out: RawRows, invalid_rows: str) -> RawRows:
    """A Hub dataset id or a dataset directory, through `datasets`."""
    loaded = load_datasets_source(ds, path)
    out.files.append(path)
    for number, row in enumerate(loaded.to_list(), start=1):
        _append(row, path, number, invalid_rows, out, 0)
    key = f"{path}|{ds.name}|{ds.split}|{ds.revision}|{getattr(loaded, '_fingerprint', '')}"
    out.fingerprint = hashlib.sha256(key.encode()).hexdigest()
    return out
