"""Prepare training and eval data: read → render → tokenise → label → filter → mix → split → cache."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

import sft
from sft.config.convert import to_dict
from sft.config.schema import Config, DatasetConfig
from sft.data.sample import RowError
from sft.data.sources import RawRows, quick_fingerprint, read_rows
from sft.data.summary import DatasetSummary, Summary
from sft.data.tokenize import ChunkResult, TokenizeOptions, process_chunk
from sft.errors import ConfigError, DataError, PluginError, Problem, SftError
from sft.paths import redact

if TYPE_CHECKING:
    from sft.manager import SftPlugins

CHUNK_ROWS = 256

# Set before forking workers: the children inherit it (render closures are not picklable).
_WORK: dict[str, Any] = {}


@attrs.frozen
class Prepared:
    """Prepared datasets (`input_ids`, `labels` columns) and what happened to every row."""

    train: Any
    eval: Any | None
    summary: Summary
    cache_dir: Path | None = None
    from_cache: bool = False


def _worker(task: tuple[int, int]) -> ChunkResult:
    start, stop = task
    return process_chunk(
        _WORK["rows"][start:stop], start, _WORK["render"], _WORK["tokenizer"], _WORK["opts"]
    )


def _num_proc(config: Config, rows: int) -> int:
    wanted = config.dataset_num_proc or (os.cpu_count() or 1)
    return max(1, min(wanted, rows // CHUNK_ROWS))


def tokenize_rows(
    raw: RawRows,
    render: Callable[[dict[str, Any]], Any],
    tokenizer: Any,
    config: Config,
    progress: Any = None,
) -> ChunkResult:
    """Process every row of one source, in parallel when `dataset_num_proc` allows."""
    opts = TokenizeOptions(
        sequence_len=config.sequence_len,
        excess_length_strategy=config.excess_length_strategy,
        invalid_rows=config.invalid_rows,
        train_on_inputs=config.train_on_inputs,
        min_sample_len=config.min_sample_len or 0,
    )
    tasks = [(i, min(i + CHUNK_ROWS, len(raw.rows))) for i in range(0, len(raw.rows), CHUNK_ROWS)]
    total = ChunkResult()
    total.dropped.update(raw.dropped)
    _WORK.update(rows=raw.rows, render=render, tokenizer=tokenizer, opts=opts)
    procs = _num_proc(config, len(raw.rows))
    try:
        if procs > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            with multiprocessing.get_context("fork").Pool(procs) as pool:
                results = pool.imap(_worker, tasks)
                _collect(results, total, raw, progress)
        else:
            _collect(map(_worker, tasks), total, raw, progress)
    finally:
        _WORK.clear()
    return total


def _collect(results: Any, total: ChunkResult, raw: RawRows, progress: Any) -> None:
    for result in results:
        order = sorted(range(len(result.sources)), key=result.sources.__getitem__)
        result.input_ids = [result.input_ids[i] for i in order]
        result.labels = [result.labels[i] for i in order]
        result.sources = [result.sources[i] for i in order]
        total.merge(result)
        if progress is not None:
            progress(len(result.sources) + sum(result.dropped.values()))


def raise_row_problems(
    result: ChunkResult, raw: RawRows, key_path: str, source: str | None
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
    rows = len(raw.rows)
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


def _weighted(
    ids: list[list[int]], labels: list[list[int]], weight: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Each sample `int(weight)` times, plus a seeded choice of the fraction left over."""
    if weight == 1.0 or not ids:
        return ids, labels
    import numpy as np

    whole, fraction = divmod(weight, 1.0)
    order = list(range(len(ids))) * int(whole)
    extra = round(fraction * len(ids))
    if extra:
        chosen = np.random.default_rng(seed).choice(len(ids), size=extra, replace=False)
        order += sorted(chosen.tolist())
    return [ids[i] for i in order], [labels[i] for i in order]


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
    "dataset_exact_deduplication",
    "special_tokens",
    "tokens",
    "tokenizer_type",
    "tokenizer_legacy",
)


def _file_contents(value: Any) -> Any:
    """Replace strings naming existing files by their content hash (templates read from files)."""
    if isinstance(value, dict):
        return {k: _file_contents(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_file_contents(v) for v in value]
    if isinstance(value, str) and "{" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        try:
            if path.is_file():
                return {"file": value, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        except OSError:
            pass
    return value


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
            "keys": _file_contents(relevant),
            "data": fingerprints,
            "tokenizer": _tokenizer_fingerprint(tokenizer),
            "strategies": sorted(f"{n}@{plugins.prompt_strategies().owner(n)}" for n in strategies),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


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
    (every key, not only those known to matter: a plugin's tokenizer hook may read any), the
    data files' and the tokenizer files' metadata, the installed plugins with their versions,
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
            "config": _file_contents(to_dict(config)),
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


def _to_dataset(ids: list[list[int]], labels: list[list[int]]) -> Any:
    import datasets

    datasets.disable_progress_bars()  # sft shows its own progress

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
        }
    )
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}, features=features)


def _process_sources(
    entries: tuple[DatasetConfig, ...],
    tokenizer: Any,
    config: Config,
    plugins: SftPlugins,
    raws: list[RawRows],
    summary: Summary,
    show_progress: bool,
    group: str = "datasets",
) -> tuple[list[list[int]], list[list[int]]]:
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for index, (ds, raw) in enumerate(zip(entries, raws, strict=True)):
        render = build_render(ds, tokenizer, config, plugins)
        name = redact(raw.name)  # shown and saved in summary.json: no URL credentials
        with _progress(f"tokenising {name}", len(raw.rows), show_progress) as advance:
            result = tokenize_rows(raw, render, tokenizer, config, advance)
        raise_row_problems(result, raw, f"{group}[{index}]", config.source)
        summary.datasets.append(
            DatasetSummary.from_samples(
                name=name,
                strategy=_strategy_for(ds),
                rows_in=len(raw.rows) + sum(raw.dropped.values()),
                rows_kept=len(set(result.sources)),
                dropped=result.dropped,
                input_ids=result.input_ids,
                labels=result.labels,
                notes=result.notes,
            )
        )
        weighted_ids, weighted_labels = _weighted(
            result.input_ids, result.labels, ds.weight, config.seed + index
        )
        if ds.weight != 1.0:
            summary.datasets[-1].notes[f"weight {ds.weight:g}: samples used"] = len(weighted_ids)
        ids.extend(weighted_ids)
        labels.extend(weighted_labels)
    return ids, labels


class _progress:
    """A rich progress bar on a terminal; nothing (one summary later) in CI logs."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
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
    raws = [_read(ds, config.invalid_rows) for ds in config.datasets]
    test_raws = [_read(ds, config.invalid_rows) for ds in config.test_datasets]
    fingerprints = [
        fast or raw.fingerprint
        for fast, raw in itertools.zip_longest(quick, (*raws, *test_raws))
        if raw is not None
    ]
    key = cache_key(config, tokenizer, fingerprints, plugins)
    cache_dir = root / key if root is not None else None
    if use_cache and cache_dir is not None and (cache_dir / "complete").exists():
        _record_alias(cache_dir.parent, alias, cache_dir)
        return _load_cached(cache_dir)
    if wait_for_cache is not None:
        if cache_dir is None:
            raise ValueError("waiting for prepared data needs dataset_prepared_path")
        while not (cache_dir / "complete").exists():
            wait_for_cache(cache_dir)
        return _load_cached(cache_dir)

    summary = Summary()
    ids, labels = _process_sources(
        config.datasets, tokenizer, config, plugins, raws, summary, show_progress
    )
    if config.dataset_exact_deduplication:
        ids, labels, summary.duplicates = _deduplicate(ids, labels)
    if not ids:  # before the eval split, whose own errors would hide this cause
        raise _no_sample_error(summary)
    import numpy as np

    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(ids)) if config.shuffle_merged_datasets else np.arange(len(ids))
    eval_ids: list[list[int]] = []
    eval_labels: list[list[int]] = []
    if config.test_datasets:
        eval_summary = Summary()
        eval_ids, eval_labels = _process_sources(
            config.test_datasets,
            tokenizer,
            config,
            plugins,
            test_raws,
            eval_summary,
            show_progress,
            "test_datasets",
        )
        summary.eval_datasets = eval_summary.datasets
    elif config.val_set_size:
        size = config.val_set_size
        count = round(len(ids) * size) if size < 1 else int(size)
        if count < 1:
            raise DataError(
                f"val_set_size = {size:g} of {len(ids)} samples holds out no sample",
                hint="raise val_set_size (a fraction, or a row count >= 1), or add data",
            )
        if count >= len(ids):
            raise DataError(
                f"val_set_size = {size:g} leaves {len(ids) - count} of {len(ids)} samples for training",
                hint="lower val_set_size, or add data",
            )
        split_order = np.random.default_rng(config.seed + 1).permutation(len(ids))
        held = set(split_order[:count].tolist())
        eval_ids = [ids[i] for i in sorted(held)]
        eval_labels = [labels[i] for i in sorted(held)]
        order = np.array([i for i in order.tolist() if i not in held], dtype=np.int64)
    train_ids = [ids[i] for i in order.tolist()]
    train_labels = [labels[i] for i in order.tolist()]
    summary.train_samples, summary.eval_samples = len(train_ids), len(eval_ids)
    if not train_ids:
        raise _no_sample_error(summary)
    prepared = Prepared(
        train=_to_dataset(train_ids, train_labels),
        eval=_to_dataset(eval_ids, eval_labels) if eval_ids else None,
        summary=summary,
        cache_dir=cache_dir,
    )
    if cache_dir is not None:
        _save_cached(prepared, cache_dir)
        _record_alias(cache_dir.parent, alias, cache_dir)
    return prepared


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


def _deduplicate(
    ids: list[list[int]], labels: list[list[int]]
) -> tuple[list[list[int]], list[list[int]], int]:
    seen: set[bytes] = set()
    kept_ids, kept_labels = [], []
    for sample_ids, sample_labels in zip(ids, labels, strict=True):
        digest = hashlib.blake2b(
            repr((sample_ids, sample_labels)).encode(), digest_size=16
        ).digest()
        if digest in seen:
            continue
        seen.add(digest)
        kept_ids.append(sample_ids)
        kept_labels.append(sample_labels)
    return kept_ids, kept_labels, len(ids) - len(kept_ids)


def _save_cached(prepared: Prepared, cache_dir: Path) -> None:
    """Written atomically: a crash never leaves a cache that a later run would load.

    Runs (or ranks) preparing the same key at once are safe without a lock: a cache directory is
    never replaced once it exists, so the first complete copy wins and a later writer's copy is
    discarded; readers only ever see complete copies.
    """
    from sft.fsutil import atomic_directory, storage_failure

    try:
        with atomic_directory(cache_dir) as tmp:
            prepared.train.save_to_disk(str(tmp / "train"))
            if prepared.eval is not None:
                prepared.eval.save_to_disk(str(tmp / "eval"))
            (tmp / "summary.json").write_text(json.dumps(prepared.summary.to_json(), indent=2))
            (tmp / "complete").write_text(sft.__version__)
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


def _load_cached(cache_dir: Path) -> Prepared:
    import datasets

    datasets.disable_progress_bars()

    eval_dir = cache_dir / "eval"
    try:
        return Prepared(
            train=datasets.load_from_disk(str(cache_dir / "train")),
            eval=datasets.load_from_disk(str(eval_dir)) if eval_dir.exists() else None,
            summary=Summary.from_json(json.loads((cache_dir / "summary.json").read_text())),
            cache_dir=cache_dir,
            from_cache=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:  # changed behind sft's back
        raise DataError(
            f"the prepared-data cache is damaged: {type(exc).__name__}: {exc}",
            file=str(cache_dir),
            hint="delete this directory; the next run prepares the data again",
        ) from exc


__all__ = ["Prepared", "cache_key", "prepare_datasets", "tokenize_rows"]
