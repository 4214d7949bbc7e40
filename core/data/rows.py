"""A dataset's rows, read lazily: one at a time, never the whole source in memory.

JSON Lines and text files line by line, CSV, Parquet and Arrow files batch by batch, saved
datasets memory-mapped, Hub datasets through `datasets.load_dataset(..., streaming=True)`. Used
by preparation (rows are tokenised a chunk at a time as they are read) and by `streaming = true`
runs. Nothing here imports torch, so `sft preprocess` starts without it.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from sft.config.schema import DatasetConfig
from sft.data.sources import (
    COMPRESSED,
    RawRows,
    _bad_row,
    _decode_csv_row,
    _fs,
    _json_problem,
    _read_bytes,
    _read_file,
    load_datasets_source,
    locate,
)
from sft.data.summary import DatasetSummary
from sft.errors import DataError

CHUNK_ROWS = 64  # rows read (Parquet, Arrow) and tokenised (streaming) at once
Row = tuple[dict[str, Any], str, int]  # a row, its file, its 1-based row (or line) number


@attrs.define
class SourceStats:
    """What streaming one dataset has read so far (over every pass). Its `dropped` counter is
    what `sources._bad_row` and `_decode_csv_row` count into (they need nothing else)."""

    name: str
    strategy: str
    rows_in: int = 0
    rows_kept: int = 0
    samples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    dropped: Counter[str] = attrs.field(factory=Counter)
    notes: Counter[str] = attrs.field(factory=Counter)

    def summary(self) -> DatasetSummary:
        return DatasetSummary(
            name=self.name,
            strategy=self.strategy,
            rows_in=self.rows_in,
            rows_kept=self.rows_kept,
            samples=self.samples,
            dropped=dict(sorted(self.dropped.items())),
            tokens=self.tokens,
            trainable_tokens=self.trainable_tokens,
            length_percentiles={},
            notes=dict(sorted(self.notes.items())),
        )


def iter_rows(ds: DatasetConfig, invalid_rows: str, stats: SourceStats) -> Iterator[Row]:
    """The rows of one dataset entry, one at a time (the sources `read_rows` reads)."""
    source = locate(ds)
    if source.datasets is not None:
        yield from _datasets_rows(ds, source.datasets, invalid_rows, stats)
        return
    for file, fmt in source.files:
        yield from _file_rows(file, fmt, ds, invalid_rows, stats)


def _kept(row: Any, file: str, number: int, invalid_rows: str, stats: SourceStats) -> bool:
    """Count a row read; a row that is not an object is raised or dropped as `read_rows` does."""
    stats.rows_in += 1
    if isinstance(row, dict):
        return True
    message = f"a row must be a JSON object, found {type(row).__name__}"
    _bad_row(stats, invalid_rows, "not an object", message, file, number)
    return False


def _bad(
    stats: SourceStats, invalid_rows: str, reason: str, message: str, file: str, n: int
) -> None:
    stats.rows_in += 1
    _bad_row(stats, invalid_rows, reason, message, file, n)


def _file_rows(
    file: str, fmt: str, ds: DatasetConfig, invalid_rows: str, stats: SourceStats
) -> Iterator[Row]:
    if fmt == "json":  # one JSON document: parsed whole (see the module docstring)
        raw = RawRows(name=file, rows=[], locations=[], files=[], fingerprint="")
        _read_file(file, fmt, ds, invalid_rows, raw, hashlib.sha256())
        stats.rows_in += sum(raw.dropped.values())
        stats.dropped.update(raw.dropped)
        for row, (_, number) in zip(raw.rows, raw.locations, strict=True):
            stats.rows_in += 1
            yield row, file, number
        return
    import pyarrow as pa

    compressed = file.lower().endswith(COMPRESSED)
    try:
        if fmt in ("parquet", "arrow") and compressed:  # random access needs the whole file
            import io

            yield from _arrow_rows(
                io.BytesIO(_read_bytes(file, ds)), fmt, file, invalid_rows, stats
            )
            return
        with _fs(file, ds).open(file, "rb", compression="infer") as handle:
            if fmt in ("jsonl", "text"):
                yield from _line_rows(handle, fmt, file, invalid_rows, stats)
            else:
                yield from _arrow_rows(handle, fmt, file, invalid_rows, stats)
    except FileNotFoundError:
        raise DataError("file not found", file=file) from None
    except pa.ArrowException as exc:
        raise DataError(f"cannot read {fmt} file: {exc}", file=file) from None
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:  # corrupt archive, I/O
        what = "corrupt or truncated compressed file" if compressed else "cannot read the file"
        raise DataError(f"{what}: {type(exc).__name__}: {exc}", file=file) from None


def _line_rows(
    handle: Iterable[bytes], fmt: str, file: str, invalid_rows: str, stats: SourceStats
) -> Iterator[Row]:
    # Binary lines end at b"\n" only, as `read_rows` splits them (not at U+2028 and the like).
    for number, data in enumerate(handle, start=1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            found = data[exc.start : exc.start + 1]
            message = f"not UTF-8 text (byte {exc.start}: {found!r})"
            _bad(stats, invalid_rows, "not UTF-8", message, file, number)
            continue
        if not line.strip():
            continue
        if fmt == "text":
            stats.rows_in += 1
            yield {"text": line.rstrip("\n").removesuffix("\r")}, file, number
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            _bad(stats, invalid_rows, "invalid JSON", _json_problem(exc), file, number)
            continue
        if _kept(row, file, number, invalid_rows, stats):
            yield row, file, number


def _arrow_rows(
    handle: Any, fmt: str, file: str, invalid_rows: str, stats: SourceStats
) -> Iterator[Row]:
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        batches: Iterable[Any] = pq.ParquetFile(handle).iter_batches(batch_size=CHUNK_ROWS)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        batches = pcsv.open_csv(handle)
    else:
        try:
            reader = pa.ipc.open_file(handle)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            handle.seek(0)
            batches = pa.ipc.open_stream(handle)
    number = 0
    for batch in batches:
        # pyarrow reads CSV cells that are not UTF-8 as binary: decoded (or the row named) here.
        binary = [f.name for f in batch.schema if fmt == "csv" and str(f.type) == "binary"]
        for row in batch.to_pylist():
            number += 1
            if binary and not _decode_csv_row(row, binary, file, number, invalid_rows, stats):
                stats.rows_in += 1
                continue
            if _kept(row, file, number, invalid_rows, stats):
                yield row, file, number


def _datasets_rows(
    ds: DatasetConfig, path: str, invalid_rows: str, stats: SourceStats
) -> Iterator[Row]:
    """A Hub dataset (streamed: `load_dataset(..., streaming=True)`), a local dataset
    repository, or a dataset saved with `save_to_disk` (memory-mapped, read row by row)."""
    import datasets

    datasets.disable_progress_bars()
    loaded = load_datasets_source(ds, path, streaming=True)
    for number, row in enumerate(loaded, start=1):
        if _kept(row, path, number, invalid_rows, stats):
            yield row, path, number
