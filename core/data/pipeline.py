"""Prepare training and eval data: read → render → tokenise → label → filter → mix → split → cache.

Memory holds a few chunks of rows, never a source: rows are read lazily, processed
`CHUNK_ROWS` at a time (in worker processes with `dataset_num_proc`), and each source's samples
are written to an Arrow file as they are made, keeping only their lengths (and digests, to
deduplicate). Weights, deduplication, shuffling and the eval split work on sample indices; the
selected samples are then copied in order, a batch at a time, into the cache entry's
`train.arrow` / `eval.arrow` (or a temporary directory without a cache).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

import sft
from sft.config.convert import to_dict
from sft.config.schema import Config, DatasetConfig
from sft.data.sample import IGNORE_INDEX, RowError
from sft.data.sources import RawRows, RowPlaces, quick_fingerprint, read_rows
from sft.data.summary import DatasetSummary, Summary
from sft.data.tokenize import ChunkResult, TokenizeOptions, process_chunk
from sft.errors import ConfigError, DataError, PluginError, Problem, SftError
from sft.paths import redact

if TYPE_CHECKING:
    from sft.manager import SftPlugins

CHUNK_ROWS = 256
IN_FLIGHT_PER_PROCESS = 2  # chunks queued per worker: enough to keep it busy, little held
WRITE_ROWS = 4096  # samples per record batch of a source's Arrow file

# Set before forking workers: the children inherit it (render closures are not picklable).
_WORK: dict[str, Any] = {}

SAMPLE_FEATURES = {"input_ids": "int32", "labels": "int32"}


@attrs.frozen
class Prepared:
    """Prepared datasets (`input_ids`, `labels` columns) and what happened to every row."""

    train: Any
    eval: Any | None
    summary: Summary
    cache_dir: Path | None = None
    from_cache: bool = False


Located = tuple[dict[str, Any], str, int]  # a row, its file, its 1-based row (or line) number


@attrs.frozen
class SampleArrays:
    """One chunk's samples in row order as flat int32 arrays: cheap to send between processes
    and to write to Arrow, where lists of Python ints cost ~70 bytes a token."""

    ids: Any  # numpy int32, every sample's ids one after another
    labels: Any  # numpy int32, likewise
    offsets: Any  # numpy int32: sample i is [offsets[i], offsets[i + 1])
    rows_kept: int
    digests: list[bytes] | None  # with dataset_exact_deduplication: one per sample

    @property
    def lengths(self) -> Any:
        import numpy as np

        return np.diff(self.offsets)


def _as_arrays(result: ChunkResult, with_digests: bool) -> SampleArrays:
    """Move a chunk's samples out of `result` (left with its counters and problems only)."""
    import numpy as np

    order = sorted(range(len(result.sources)), key=result.sources.__getitem__)
    lengths = np.fromiter((len(result.input_ids[i]) for i in order), np.int64, len(order))
    offsets = np.zeros(len(order) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(
        itertools.chain.from_iterable(result.input_ids[i] for i in order), np.int32, total
    )
    labels = np.fromiter(
        itertools.chain.from_iterable(result.labels[i] for i in order), np.int32, total
    )
    digests = None
    if with_digests:
        digests = [
            hashlib.blake2b(
                ids[a:b].tobytes() + b"|" + labels[a:b].tobytes(), digest_size=16
            ).digest()
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
        ]
    arrays = SampleArrays(ids, labels, offsets.astype(np.int32), len(set(result.sources)), digests)
    result.input_ids, result.labels, result.sources = [], [], []
    return arrays


def _worker(task: tuple[int, list[dict[str, Any]]]) -> tuple[SampleArrays, ChunkResult]:
    first_index, rows = task
    result = process_chunk(rows, first_index, _WORK["render"], _WORK["tokenizer"], _WORK["opts"])
    return _as_arrays(result, _WORK["digests"]), result


def _chunks(
    rows: Iterable[Located], places: RowPlaces
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """`CHUNK_ROWS` rows at a time with the index of the first, each row's place recorded."""
    index = 0
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, CHUNK_ROWS)):
        for _, file, number in chunk:
            places.add(file, number)
        yield index, [row for row, _, _ in chunk]
        index += len(chunk)


def _processed(
    tasks: Iterator[tuple[int, list[dict[str, Any]]]], procs: int
) -> Iterator[tuple[SampleArrays, ChunkResult]]:
    """Each chunk processed, in order; with several processes at most a few chunks are queued,
    so the rows are read as fast as they are tokenised, never all at once."""
    first = list(itertools.islice(tasks, procs))
    if procs <= 1 or len(first) < procs:  # a small source: no pool to start
        yield from map(_worker, itertools.chain(first, tasks))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pending: collections.deque[Any] = collections.deque()
        for task in itertools.chain(first, tasks):
            pending.append(pool.apply_async(_worker, (task,)))
            if len(pending) >= procs * IN_FLIGHT_PER_PROCESS:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@attrs.define
class SourceSamples:
    """One source's samples, written to an Arrow file as they were made."""

    path: Path
    lengths: Any  # numpy int32, per sample
    digests: list[bytes] | None
    summary: DatasetSummary


def tokenize_rows(
    rows: Iterable[Located],
    places: RowPlaces,
    render: Callable[[dict[str, Any]], Any],
    tokenizer: Any,
    config: Config,
    path: Path,
    progress: Any = None,
) -> tuple[ChunkResult, SourceSamples]:
    """Process every row of one source (in parallel when `dataset_num_proc` allows), writing
    the samples to the Arrow file `path`: memory holds a few chunks, not the source.

    Returns the counters and row problems (no samples), and the samples written.
    """
    import numpy as np
    from datasets.arrow_writer import ArrowWriter

    opts = TokenizeOptions(
        sequence_len=config.sequence_len,
        excess_length_strategy=config.excess_length_strategy,
        invalid_rows=config.invalid_rows,
        train_on_inputs=config.train_on_inputs,
        min_sample_len=config.min_sample_len or 0,
    )
    total = ChunkResult()
    lengths: list[Any] = []
    digests: list[bytes] | None = [] if config.dataset_exact_deduplication else None
    tokens = trainable = rows_kept = 0
    _WORK.update(render=render, tokenizer=tokenizer, opts=opts, digests=digests is not None)
    procs = config.dataset_num_proc or (os.cpu_count() or 1)
    writer = ArrowWriter(features=_features(), path=str(path))
    pending: list[SampleArrays] = []
    try:
        for arrays, result in _processed(_chunks(rows, places), procs):
            total.merge(result)
            if result.error_count or result.contract is not None:
                continue  # reported once the whole source is read; nothing is written
            lengths.append(arrays.lengths.astype(np.int32))
            tokens += len(arrays.ids)
            trainable += int(np.count_nonzero(arrays.labels != IGNORE_INDEX))
            rows_kept += arrays.rows_kept
            if digests is not None and arrays.digests is not None:
                digests.extend(arrays.digests)
            pending.append(arrays)
            if sum(len(a.offsets) - 1 for a in pending) >= WRITE_ROWS:
                writer.write_table(_arrow_table(pending))
                pending.clear()
            if progress is not None:
                progress(len(arrays.offsets) - 1 + sum(result.dropped.values()))
        if pending:
            writer.write_table(_arrow_table(pending))
    finally:
        _WORK.clear()
        writer.finalize()
        writer.close()
    every_length = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    summary = DatasetSummary.from_lengths(
        name=places.name,
        strategy="",
        rows_in=0,
        rows_kept=rows_kept,
        dropped=total.dropped,
        lengths=every_length,
        tokens=tokens,
        trainable_tokens=trainable,
        notes=total.notes,
    )
    return total, SourceSamples(path, every_length, digests, summary)


def _features() -> Any:
    import datasets

    return datasets.Features(
        {name: datasets.Sequence(datasets.Value(kind)) for name, kind in SAMPLE_FEATURES.items()}
    )


def _arrow_table(chunks: list[SampleArrays]) -> Any:
    """Chunks' samples as one Arrow table (one record batch)."""
    import numpy as np
    import pyarrow as pa

    starts = np.cumsum([0] + [len(c.ids) for c in chunks[:-1]])
    offsets = np.concatenate(
        [c.offsets[:-1] + start for c, start in zip(chunks, starts, strict=True)]
        + [np.array([starts[-1] + len(chunks[-1].ids)])]
    )
    offsets_array = pa.array(offsets, pa.int32())
    return pa.table(
        {
            name: pa.ListArray.from_arrays(
                offsets_array, pa.array(np.concatenate([getattr(c, field) for c in chunks]))
            )
            for name, field in (("input_ids", "ids"), ("labels", "labels"))
        }
    )


def raise_row_problems(
    result: ChunkResult, raw: RawRows | RowPlaces, key_path: str, source: str | None
) -> None:
    """Report the rows of one dataset that could not be prepared, all at once.

    When every row fails because of the same dataset key (a field mapping that matches nothing),
    that is a config error on the key; otherwise a data error with the count and the first few
    rows, each with its file, row, field and reason.
    """
    if result.contract is not None:
        file, number = raw.where(result.contract.index)
        raise PluginError(
            f"{result.contract.message} for {file}, row {number} ({key_path}); expected "
            "Rendered or Tokenized (sft.plugin), or a list of them. This is a bug in the "
            "plugin: report it to its authors"
        )
    rows = raw.count
    for key, count in result.blamed.items():
        if rows > 1 and count == rows:  # one row proves nothing about the key
            example = result.blamed_example[key]
            file, number = raw.where(example.index)
            raise ConfigError(
                [
                    Problem(
                        f"{key_path}.{key}",
                        f"fails on every row of {raw.name} ({rows} rows); e.g. {file}, row "
                        f"{number}: {example.message}",
                        hint="set it to match your data (the message shows what a row holds)",
                    )
                ],
                source,
            )
    if not result.error_count:
        return
    reasons = {p.reason for p in result.errors}
    hint = (
        'raise sequence_len, or set excess_length_strategy = "drop" or "truncate"'
        if reasons == {"too long"}
        else 'fix the rows, or set invalid_rows = "skip" to skip and count such rows'
    )
    places = [(p, *raw.where(p.index)) for p in result.errors]
    first, first_file, first_row = places[0]
    if result.error_count == 1:
        raise DataError(
            f"{first.reason}: {first.message}",
            file=first_file,
            row=first_row,
            field=first.field,
            hint=hint,
        )
    one_file = len(raw.files) == 1
    lines = []
    for problem, file, number in places:
        where = f"row {number}" if one_file else f"{file}, row {number}"
        field = f", field {problem.field!r}" if problem.field else ""
        lines.append(f"  {where}{field}: {problem.reason}: {problem.message}")
    if result.error_count > len(places):
        lines.append(f"  ... and {result.error_count - len(places)} more")
    error = DataError(
        f"{result.error_count} of {rows} rows cannot be prepared; the first {len(places)}:\n"
        + "\n".join(lines),
        file=raw.files[0] if one_file else raw.name,
        hint=hint,
    )
    error.row, error.field = first_row, first.field  # the first failing row, for callers
    raise error


def _read(ds: DatasetConfig, invalid_rows: str) -> RawRows:
    raw = read_rows(ds, invalid_rows)
    if ds.shards is not None and ds.shards_idx is not None:
        raw = raw.shard(ds.shards, ds.shards_idx)
    return raw


def _weighted(count: int, weight: float, seed: int) -> Any:
    """Indices of a source's samples: each `int(weight)` times, plus a seeded choice of the
    fraction left over (in order)."""
    import numpy as np

    every = np.arange(count, dtype=np.int64)
    if weight == 1.0 or not count:
        return every
    whole, fraction = divmod(weight, 1.0)
    parts = [every] * int(whole)
    extra = round(fraction * count)
    if extra:
        chosen = np.random.default_rng(seed).choice(count, size=extra, replace=False)
        parts.append(np.sort(chosen).astype(np.int64))
    return np.concatenate(parts) if parts else every[:0]


def _strategy_for(ds: DatasetConfig) -> str:
    return ds.type or "pretokenized"


@attrs.frozen
class StrategyRender:
    """A prompt strategy's row renderer, with who made it (for errors that name the plugin)."""

    render: Callable[[dict[str, Any]], Any]
    strategy: str  # "prompt strategy 'alpaca' (plugin alpaca, package sft-train 0.1.0)"

    def __call__(self, row: dict[str, Any]) -> Any:
        return self.render(row)


def build_render(
    ds: DatasetConfig, tokenizer: Any, config: Config, plugins: SftPlugins
) -> StrategyRender:
    registry = plugins.prompt_strategies()
    name = _strategy_for(ds)
    strategy = registry.get(name)
    who = f"prompt strategy {name!r} ({plugins.describe(registry.owner(name))})"
    try:
        render = strategy.factory(ds, tokenizer, config)
    except (SftError, RowError):
        raise
    except Exception as exc:  # the plugin's bug: say whose
        raise PluginError(
            f"{who}: its factory raised {type(exc).__name__}: {exc}",
            plugin=registry.owner(name),
        ) from exc
    if not callable(render):
        raise PluginError(
            f"{who}: its factory returned {type(render).__name__}, not a callable "
            "(row -> Rendered | Tokenized | list of them)",
            plugin=registry.owner(name),
        )
    return StrategyRender(render, who)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else repr(tokenizer),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


_RELEVANT_ROOT_KEYS = (
    "sequence_len",
    "excess_length_strategy",
    "min_sample_len",
    "invalid_rows",
    "train_on_inputs",
    "val_set_size",
    "seed",
    "shuffle_merged_datasets",
    "curriculum_sampling",
    "dataset_exact_deduplication",
    "special_tokens",
    "tokens",
    "tokenizer_type",
    "tokenizer_legacy",
)


def _files_described(value: Any, describe: Callable[[Path], dict[str, Any]], skip: set[str]) -> Any:
    """`value` with every string that names an existing file (and is not in `skip`) replaced by
    `describe(path)`: a key naming a file (e.g. a jinja template) stands for the file."""
    if isinstance(value, dict):
        return {k: _files_described(v, describe, skip) for k, v in value.items()}
    if isinstance(value, list):
        return [_files_described(v, describe, skip) for v in value]
    if isinstance(value, str) and "{" not in value and len(value) < 4096 and value not in skip:
        path = Path(value).expanduser()
        try:
            if path.is_file():
                return {"file": value, **describe(path)}
        except OSError:
            pass
    return value


def _content_digest(path: Path) -> dict[str, Any]:
    """The file's sha256, read a block at a time (memory stays flat for a file of any size)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return {"sha256": digest.hexdigest()}


def _metadata(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _data_paths(config: Config) -> set[str]:
    """The paths the dataset entries read (their data is identified by the sources'
    fingerprints, not hashed a second time as a key's value)."""
    paths = set()
    for ds in (*config.datasets, *config.test_datasets):
        paths.add(ds.path)
        files = ds.data_files
        paths.update([files] if isinstance(files, str) else files or ())
    return paths


def cache_key(config: Config, tokenizer: Any, fingerprints: list[str], plugins: SftPlugins) -> str:
    """Hash of everything that can change the prepared data.

    Every plugin-owned key is included (a plugin may change rendering from a top-level key), and
    a key naming a file (e.g. a jinja template) contributes the file's content.
    """
    data = to_dict(config)
    core = attrs.fields_dict(Config)
    relevant = {k: data[k] for k in _RELEVANT_ROOT_KEYS}
    relevant["datasets"] = data["datasets"]
    relevant["test_datasets"] = data["test_datasets"]
    relevant["plugin_keys"] = {k: v for k, v in data.items() if k not in core}
    strategies = {_strategy_for(d) for d in (*config.datasets, *config.test_datasets)}
    payload = json.dumps(
        {
            "sft": sft.__version__,
            "format": CACHE_FORMAT,
            "keys": _files_described(relevant, _content_digest, skip=_data_paths(config)),
            "data": fingerprints,
            "tokenizer": _tokenizer_fingerprint(tokenizer),
            "strategies": sorted(f"{n}@{plugins.prompt_strategies().owner(n)}" for n in strategies),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


CACHE_FORMAT = 2  # 2: train.arrow / eval.arrow files (1: save_to_disk directories)
ALIASES = "by-source"  # dataset_prepared_path/by-source/<source alias>: the entry's name
# Files of a model directory that hold weights, not the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def _tokenizer_source(config: Config) -> list[Any] | None:
    """The tokenizer's local files by path, size and modification time; None for a Hub id."""
    name = config.tokenizer_config or config.base_model
    path = Path(name).expanduser()
    try:
        if path.is_file():  # a GGUF file: its tokenizer is converted from it
            return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
        if path.is_dir():
            files = sorted(
                f for f in path.iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)
            )
            return [str(path.resolve())] + [
                [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files
            ]
    except OSError:
        return None
    return None


def source_alias(config: Config, plugins: SftPlugins, quick: list[str | None]) -> str | None:
    """A key from the config and file metadata alone, before any tokenizer is loaded.

    It names the cache entry that a run with exactly these inputs prepared: the whole config
    (every key, not only those known to matter: a plugin's tokenizer hook may read any; a key
    naming a file by the file's size and modification time), the data files' and the tokenizer
    files' metadata, the installed plugins with their versions,
    and the versions of sft, transformers, tokenizers and datasets. Anything else is looked up
    the slow way (the tokenizer loaded, the full key computed). None when some input has no
    metadata (a Hub model or dataset).
    """
    from importlib.metadata import PackageNotFoundError, version

    tokenizer_files = _tokenizer_source(config)
    if tokenizer_files is None or any(f is None for f in quick):
        return None
    versions: dict[str, str | None] = {}
    for package in ("transformers", "tokenizers", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    payload = json.dumps(
        {
            "sft": sft.__version__,
            "format": CACHE_FORMAT,
            "config": _files_described(to_dict(config), _metadata, skip=set()),
            "data": quick,
            "tokenizer": tokenizer_files,
            "plugins": sorted(
                [name, record.package, record.version] for name, record in plugins.records.items()
            ),
            "versions": versions,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _record_alias(root: Path, alias: str | None, entry: Path) -> None:
    """Point the source alias at a complete cache entry (best effort: only a later cache hit
    is faster for it)."""
    if alias is None:
        return
    target = root / ALIASES / alias
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{alias}.{os.getpid()}")
        temporary.write_text(entry.name)
        temporary.replace(target)
    except OSError:
        pass


def _process_sources(
    entries: tuple[DatasetConfig, ...],
    raws: list[RawRows | None],
    tokenizer: Any,
    config: Config,
    plugins: SftPlugins,
    summary: Summary,
    show_progress: bool,
    work: Path,
    group: str = "datasets",
) -> list[tuple[SourceSamples, Any]]:
    """Each source's samples (written under `work`) and the indices of them its weight uses.

    A source in `raws` was read up front; None: read lazily while it is tokenised.
    """
    from collections import Counter

    from sft.data.rows import SourceStats, iter_rows

    prepared = []
    for index, (ds, raw) in enumerate(zip(entries, raws, strict=True)):
        render = build_render(ds, tokenizer, config, plugins)
        places = RowPlaces(ds.path)
        if raw is None:
            stats = SourceStats(ds.path, _strategy_for(ds))
            rows: Iterable[Located] = iter_rows(ds, config.invalid_rows, stats)
        else:
            rows = raw.located()
        name = redact(ds.path)  # shown and saved in summary.json: no URL credentials
        with _progress(f"tokenising {name}", raw.count if raw else None, show_progress) as advance:
            result, samples = tokenize_rows(
                rows, places, render, tokenizer, config, work / f"{group}-{index}.arrow", advance
            )
        raise_row_problems(result, places, f"{group}[{index}]", config.source)
        if raw is None:
            rows_in, read_dropped = stats.rows_in, stats.dropped
        else:
            rows_in, read_dropped = raw.count + sum(raw.dropped.values()), raw.dropped
        dropped = Counter(read_dropped)
        dropped.update(result.dropped)
        samples.summary = attrs.evolve(
            samples.summary,
            name=name,
            strategy=_strategy_for(ds),
            rows_in=rows_in,
            dropped=dict(sorted(dropped.items())),
        )
        summary.datasets.append(samples.summary)
        used = _weighted(len(samples.lengths), ds.weight, config.seed + index)
        if ds.weight != 1.0:
            summary.datasets[-1].notes[f"weight {ds.weight:g}: samples used"] = len(used)
        prepared.append((samples, used))
    return prepared


def _mixed(sources: list[tuple[SourceSamples, Any]]) -> Selection:
    """The samples the sources' weights use, in order, as rows of their files taken as one."""
    import numpy as np

    starts = np.cumsum([0] + [len(samples.lengths) for samples, _ in sources])
    used = [start + indices for start, (_, indices) in zip(starts, sources, strict=False)]
    return Selection(
        [samples.path for samples, _ in sources],
        np.concatenate(used) if used else np.zeros(0, np.int64),
        int(starts[-1]),
    )


@attrs.frozen
class Selection:
    """Samples to write: rows `indices` of the Arrow files `paths` taken as one table (of
    `rows` rows)."""

    paths: list[Path]
    indices: Any  # numpy int64
    rows: int

    def of(self, indices: Any) -> Selection:
        return attrs.evolve(self, indices=indices)


@attrs.frozen
class Plan:
    """What preparing decided: the training samples, the eval samples, the summary."""

    train: Selection
    eval: Selection | None
    summary: Summary


class _progress:
    """A rich progress bar on a terminal; nothing (one summary later) in CI logs."""

    def __init__(self, description: str, total: int | None, enabled: bool) -> None:
        self.description, self.total, self.enabled = description, total, enabled
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import Progress

        console = Console(stderr=True)
        if not console.is_terminal:
            return None
        self.bar = Progress(console=console, transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def prepare_datasets(
    config: Config,
    tokenizer: Any = None,
    plugins: SftPlugins | None = None,
    show_progress: bool = True,
    use_cache: bool = True,
    wait_for_cache: Callable[[Path], None] | None = None,
) -> Prepared:
    """Prepare the config's training and eval data (from the cache when nothing changed).

    `wait_for_cache` (the other processes of a multi-process run): do not tokenise; the data
    is read only to compute the cache key, then `wait_for_cache(cache_dir)` is called until
    the process that prepares (local rank 0) has written that cache entry, which is loaded.
    """
    if plugins is None:
        plugins = config.plugin_set
    entries = (*config.datasets, *config.test_datasets)
    root = Path(config.dataset_prepared_path) if config.dataset_prepared_path else None
    # The cache key from file metadata first: a cache hit reads no data at all.
    quick = [quick_fingerprint(ds) for ds in entries] if root is not None else []
    alias = source_alias(config, plugins, quick) if root is not None else None
    if root is not None and alias is not None:
        known = root / ALIASES / alias
        if tokenizer is None and use_cache and wait_for_cache is None and known.is_file():
            # Exactly these inputs were prepared before: no tokenizer to load (transformers
            # and torch are not even imported).
            entry = root / known.read_text().strip()
            if (entry / "complete").exists():
                return _load_cached(entry)
    if tokenizer is None:
        from sft.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config, plugins)
    if root is not None and all(f is not None for f in quick):
        quick_dir = root / cache_key(config, tokenizer, quick, plugins)  # type: ignore[arg-type]
        if use_cache and (quick_dir / "complete").exists():
            _record_alias(root, alias, quick_dir)
            return _load_cached(quick_dir)
        if wait_for_cache is not None:  # the key is known: nothing to read
            while not (quick_dir / "complete").exists():
                wait_for_cache(quick_dir)
            return _load_cached(quick_dir)
    # A source is read up front only when the cache key needs its content (no metadata to
    # fingerprint it by) or a shard needs its row count; the others are read while tokenising.
    quick_of = quick or [None] * len(entries)
    raws: list[RawRows | None] = [
        _read(ds, config.invalid_rows)
        if (root is not None and fast is None) or ds.shards is not None
        else None
        for ds, fast in zip(entries, quick_of, strict=True)
    ]
    cache_dir = None
    if root is not None:
        fingerprints = [
            fast or raw.fingerprint  # type: ignore[union-attr]
            for fast, raw in zip(quick_of, raws, strict=True)
        ]
        cache_dir = root / cache_key(config, tokenizer, fingerprints, plugins)
        if use_cache and (cache_dir / "complete").exists():
            _record_alias(root, alias, cache_dir)
            return _load_cached(cache_dir)
    if wait_for_cache is not None:
        if cache_dir is None:
            raise ValueError("waiting for prepared data needs dataset_prepared_path")
        while not (cache_dir / "complete").exists():
            wait_for_cache(cache_dir)
        return _load_cached(cache_dir)

    if cache_dir is None:
        work = _temporary_dir()
        plan = _prepare(config, tokenizer, plugins, raws, show_progress, work)
        prepared = Prepared(
            train=_written(plan.train, work / TRAIN_FILE),
            eval=_written(plan.eval, work / EVAL_FILE) if plan.eval else None,
            summary=plan.summary,
        )
        _remove_sources(plan)
        return prepared
    with _cache_entry(cache_dir) as staging:  # the samples are written there as they are made
        plan = _prepare(config, tokenizer, plugins, raws, show_progress, staging)
        _write_selection(plan.train, staging / TRAIN_FILE)
        if plan.eval is not None:
            _write_selection(plan.eval, staging / EVAL_FILE)
        _remove_sources(plan)
        (staging / "summary.json").write_text(json.dumps(plan.summary.to_json(), indent=2))
        (staging / "complete").write_text(sft.__version__)
    assert root is not None
    _record_alias(root, alias, cache_dir)
    return attrs.evolve(_load_cached(cache_dir), from_cache=False)


def _remove_sources(plan: Plan) -> None:
    """The per-source files, once the selections are written (a mapping still open keeps its
    file's data until it closes)."""
    for path in {*plan.train.paths, *(plan.eval.paths if plan.eval else [])}:
        path.unlink(missing_ok=True)


def _temporary_dir() -> Path:
    """Where prepared data without a cache is written: it lives as long as the process (the
    datasets read it memory-mapped)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sft-prepared-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _prepare(
    config: Config,
    tokenizer: Any,
    plugins: SftPlugins,
    raws: list[RawRows | None],
    show_progress: bool,
    work: Path,
) -> Plan:
    """Tokenise every source into `work`, then mix, deduplicate, shuffle and split by index."""
    import numpy as np

    summary = Summary()
    count = len(config.datasets)
    sources = _process_sources(
        config.datasets, raws[:count], tokenizer, config, plugins, summary, show_progress, work
    )
    mixed = _mixed(sources)
    used = mixed.indices
    if config.dataset_exact_deduplication:
        used, summary.duplicates = _deduplicate(used, sources)
    if not len(used):  # before the eval split, whose own errors would hide this cause
        raise _no_sample_error(summary)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(used)) if config.shuffles_samples else np.arange(len(used))
    eval_data: Selection | None = None
    if config.test_datasets:
        eval_summary = Summary()
        eval_sources = _process_sources(
            config.test_datasets,
            raws[count:],
            tokenizer,
            config,
            plugins,
            eval_summary,
            show_progress,
            work,
            "test_datasets",
        )
        summary.eval_datasets = eval_summary.datasets
        eval_mixed = _mixed(eval_sources)
        if len(eval_mixed.indices):
            eval_data = eval_mixed
    elif config.val_set_size:
        size = config.val_set_size
        total = len(used)
        held_count = round(total * size) if size < 1 else int(size)
        if held_count < 1:
            raise DataError(
                f"val_set_size = {size:g} of {total} samples holds out no sample",
                hint="raise val_set_size (a fraction, or a row count >= 1), or add data",
            )
        if held_count >= total:
            raise DataError(
                f"val_set_size = {size:g} leaves {total - held_count} of {total} samples for "
                "training",
                hint="lower val_set_size, or add data",
            )
        held = np.zeros(total, dtype=bool)
        held[np.random.default_rng(config.seed + 1).permutation(total)[:held_count]] = True
        eval_data = mixed.of(used[np.flatnonzero(held)])
        order = order[~held[order]]
    summary.train_samples = len(order)
    summary.eval_samples = len(eval_data.indices) if eval_data is not None else 0
    if not len(order):
        raise _no_sample_error(summary)
    return Plan(mixed.of(used[order]), eval_data, summary)


TRAIN_FILE, EVAL_FILE = "train.arrow", "eval.arrow"
# Samples gathered and written (one record batch) at a time: few batches keep the file's
# headers few, which reading it touches. Fewer when they are long: at most GATHER_TOKENS tokens
# (16 MiB a feature) are held at once.
GATHER_ROWS = 4096
GATHER_TOKENS = 1 << 22


_TOKEN_BYTES = 4  # every sample feature is a list of int32


def _sample_layout(path: Path) -> list[tuple[Any, dict[str, Any]]]:
    """Per record batch of the Arrow stream file `path`: its samples' lengths, and for each
    feature the file offset of every sample's values. Reads only the messages' headers and the
    offsets, through a mapping whose pages are dropped after each batch (a kernel with large
    page-cache folios maps up to 2 MiB for each one touched)."""
    import pyarrow as pa

    if path.stat().st_size == 0:
        return []
    with path.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
    whole = pa.py_buffer(mapped)
    layout = []
    for batch in pa.ipc.open_stream(whole):
        layout.append(_batch_layout(batch, whole.address))
        mapped.madvise(mmap.MADV_DONTNEED)
    # Unmapped once nothing refers to it (not closed here: a view that something else, e.g. a
    # debugger's frame, still holds would make closing fail).
    return layout


def _batch_layout(batch: Any, base: int) -> tuple[Any, dict[str, Any]]:
    import numpy as np

    lengths, positions = np.zeros(0, np.int32), {}
    for name in SAMPLE_FEATURES:
        column = batch.column(name)
        offsets = column.offsets.to_numpy().astype(np.int64)  # a copy
        values = column.values  # the whole child array, which the offsets index
        start = values.buffers()[1].address - base + values.offset * _TOKEN_BYTES
        positions[name] = start + offsets[:-1] * _TOKEN_BYTES
        lengths = np.diff(offsets).astype(np.int32)
    return lengths, positions


class _SampleFiles:
    """Where each sample of some Arrow stream files lies on disk, so that any selection of them
    is read with positioned reads (`pread`) into fresh buffers.

    A memory mapping would do the same reads, but every page it touches counts as the process's
    memory until told otherwise, and a kernel with large page-cache folios maps up to 2 MiB per
    touched sample: gathering shuffled samples through one kept ~1 GiB resident at 1M rows.
    """

    def __init__(self, paths: list[Path]) -> None:
        import numpy as np

        self.descriptors: list[int] = []
        file_of, lengths = [], []
        positions: dict[str, list[Any]] = {name: [] for name in SAMPLE_FEATURES}
        try:
            for number, path in enumerate(paths):
                self.descriptors.append(os.open(path, os.O_RDONLY))
                for batch_lengths, batch_positions in _sample_layout(path):
                    lengths.append(batch_lengths)
                    file_of.append(np.full(len(batch_lengths), number, np.int32))
                    for name in SAMPLE_FEATURES:
                        positions[name].append(batch_positions[name])
        except BaseException:
            self.close()
            raise
        self.file_of = np.concatenate(file_of) if file_of else np.zeros(0, np.int32)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        self.positions = {
            name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
            for name, parts in positions.items()
        }

    def table(self, indices: Any) -> Any:
        """Samples `indices` (in that order) as one Arrow table."""
        import numpy as np
        import pyarrow as pa

        lengths = self.lengths[indices].astype(np.int64)
        offsets = np.zeros(len(indices) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        list_offsets = pa.array(offsets, pa.int32())
        columns = {}
        for name, positions in self.positions.items():
            values = np.empty(int(offsets[-1]), np.int32)
            view = values.data.cast("B")
            for file, position, start, length in zip(
                self.file_of[indices].tolist(),
                positions[indices].tolist(),
                (offsets[:-1] * _TOKEN_BYTES).tolist(),
                (lengths * _TOKEN_BYTES).tolist(),
                strict=True,
            ):
                read = os.preadv(self.descriptors[file], [view[start : start + length]], position)
                if read != length:
                    raise OSError(f"short read of a prepared-data file ({read} of {length} bytes)")
            columns[name] = pa.ListArray.from_arrays(list_offsets, pa.array(values))
        return pa.table(columns)

    def close(self) -> None:
        for descriptor in self.descriptors:
            os.close(descriptor)
        self.descriptors = []


def _write_selection(selection: Selection, path: Path) -> None:
    """Write the selected samples in order to the Arrow file `path` (bounded memory: a batch
    at a time, read from the sources with positioned reads)."""
    import datasets
    import numpy as np
    from datasets.arrow_writer import ArrowWriter

    datasets.disable_progress_bars()  # sft shows its own progress
    indices = selection.indices
    every = len(indices) == selection.rows and np.array_equal(indices, np.arange(len(indices)))
    if every and len(selection.paths) == 1:
        selection.paths[0].replace(path)  # every sample, in order: nothing to copy
        return
    sources = _SampleFiles(selection.paths)
    writer = ArrowWriter(features=_features(), path=str(path), writer_batch_size=GATHER_ROWS)
    lengths = sources.lengths[indices]
    try:
        start = 0
        while start < len(indices):
            tokens = np.cumsum(lengths[start : start + GATHER_ROWS], dtype=np.int64)
            stop = start + max(1, int(np.searchsorted(tokens, GATHER_TOKENS, side="right")))
            writer.write_table(sources.table(indices[start:stop]))
            start = stop
    finally:
        writer.finalize()
        writer.close()
        sources.close()


def _written(selection: Selection, path: Path) -> Any:
    """`_write_selection`, then the file as a memory-mapped dataset."""
    import datasets

    _write_selection(selection, path)
    return datasets.Dataset.from_file(str(path))


def _no_sample_error(summary: Summary) -> DataError:
    """Nothing left to train on: say, per dataset, how many rows were read and why they went."""
    reasons = {r for d in summary.datasets for r in d.dropped}
    fixes = []
    if not any(d.rows_in for d in summary.datasets):
        fixes.append("the datasets hold no rows: check the files")
    if "longer than sequence_len" in reasons:
        fixes.append('raise sequence_len, or set excess_length_strategy = "truncate"')
    if "no trainable tokens" in reasons:
        fixes.append("check roles_to_train / train_on_eos / the field mappings")
    if reasons - {"longer than sequence_len", "no trainable tokens"}:
        fixes.append('fix the malformed rows (invalid_rows = "raise" names each one)')
    return DataError(
        "no training sample left after preparing the data:\n"
        + "\n".join(f"  {d.rows_line()}" for d in summary.datasets),
        hint="; ".join(fixes) or None,
    )


def _deduplicate(used: Any, sources: list[tuple[SourceSamples, Any]]) -> tuple[Any, int]:
    """The first of every group of samples whose ids and labels are equal, in order."""
    import numpy as np

    digests = [d for samples, _ in sources for d in (samples.digests or [])]
    seen: set[bytes] = set()
    kept = []
    for index in used.tolist():
        if digests[index] not in seen:
            seen.add(digests[index])
            kept.append(index)
    return np.array(kept, dtype=np.int64), len(used) - len(kept)


@contextlib.contextmanager
def _cache_entry(cache_dir: Path) -> Iterator[Path]:
    """A staging directory that becomes `cache_dir` when the block succeeds.

    Written atomically: a crash never leaves a cache that a later run would load. Runs (or
    ranks) preparing the same key at once are safe without a lock: a cache directory is never
    replaced once it exists, so the first complete copy wins and a later writer's copy is
    discarded; readers only ever see complete copies.
    """
    from sft.fsutil import atomic_directory, storage_failure

    try:
        with atomic_directory(cache_dir) as staging:
            yield staging
    except Exception as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        raise DataError(
            f"cannot write the prepared data: {reason}",
            file=str(cache_dir),
            hint="free space on that disk, or point dataset_prepared_path at a directory with "
            "room (nothing half-written was left behind)",
        ) from exc


def _save_cached(prepared: Prepared, cache_dir: Path) -> None:
    """Write prepared datasets (any `datasets.Dataset`) as a cache entry."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    with _cache_entry(cache_dir) as staging:
        for dataset, name in ((prepared.train, TRAIN_FILE), (prepared.eval, EVAL_FILE)):
            if dataset is None:
                continue
            writer = ArrowWriter(features=_features(), path=str(staging / name))
            try:
                for batch in dataset.with_format("arrow").iter(batch_size=GATHER_ROWS):
                    writer.write_table(
                        pa.Table.from_batches([batch])
                        if isinstance(batch, pa.RecordBatch)
                        else batch
                    )
            finally:
                writer.finalize()
                writer.close()
        (staging / "summary.json").write_text(json.dumps(prepared.summary.to_json(), indent=2))
        (staging / "complete").write_text(sft.__version__)


def _load_cached(cache_dir: Path) -> Prepared:
    import datasets

    datasets.disable_progress_bars()

    eval_file = cache_dir / EVAL_FILE
    try:
        return Prepared(
            train=datasets.Dataset.from_file(str(cache_dir / TRAIN_FILE)),
            eval=datasets.Dataset.from_file(str(eval_file)) if eval_file.exists() else None,
            summary=Summary.from_json(json.loads((cache_dir / "summary.json").read_text())),
            cache_dir=cache_dir,
            from_cache=True,
        )
    except (OSError, ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise DataError(
            f"the prepared-data cache is damaged: {type(exc).__name__}: {exc}",
            file=str(cache_dir),
            hint="delete this directory; the next run prepares the data again",
        ) from exc


__all__ = ["Prepared", "cache_key", "prepare_datasets", "tokenize_rows"]
