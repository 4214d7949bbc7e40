"""`streaming = true`: the training data read, tokenised, shuffled and packed while training.

No dataset is held whole and nothing is cached. Rows are read lazily: JSON Lines and text
files line by line, CSV, Parquet and Arrow files batch by batch, saved datasets memory-mapped,
Hub datasets through `datasets.load_dataset(..., streaming=True)`. (A `.json` file is one JSON
document: it is parsed whole, so use JSON Lines for data larger than memory.) Each dataset's rows
are tokenised `CHUNK_ROWS` at a time by the code the prepared path uses (`build_render` +
`process_chunk`), so samples and labels are the same; the datasets are mixed with probabilities
proportional to their `weight`; and `streaming_multipack_buffer_size` samples at a time are
packed (`sample_packing`, the configured packer, `PackedDataset`'s row format) and shuffled
(`shuffle_merged_datasets`, seeded by `seed` and the pass number).

Several processes: every process reads the same stream in the same order, and accelerate's data
loader gives each its own batches; see `dataloader_settings`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from torch.utils.data import IterableDataset

from sft.config.schema import Config
from sft.data.packing import PackedDataset
from sft.data.pipeline import Prepared, build_render, raise_row_problems
from sft.data.rows import CHUNK_ROWS, Row, SourceStats, iter_rows
from sft.data.sample import IGNORE_INDEX
from sft.data.sources import RawRows, quick_fingerprint
from sft.data.summary import Summary
from sft.data.tokenize import TokenizeOptions, process_chunk
from sft.errors import DataError
from sft.paths import redact

if TYPE_CHECKING:
    from sft.manager import SftPlugins

Sample = tuple[list[int], list[int]]  # input_ids, labels


# -- the dataset the Trainer iterates ---------------------------------------------------------


class _Columns:
    """Samples held in memory, indexed as `PackedDataset` indexes its Arrow base."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __getitem__(self, indices: list[int]) -> dict[str, list[list[int]]]:
        return {
            "input_ids": [self.samples[i][0] for i in indices],
            "labels": [self.samples[i][1] for i in indices],
        }


class StreamingDataset(IterableDataset):
    """The training rows of a streaming run: `{"input_ids", "labels"}` per sample, or packed
    rows with `position_ids` (as `PackedDataset` makes them) under `sample_packing`.

    Each iteration is one pass over the data: it ends when every dataset has been read to its
    end at least once (a dataset that ends earlier starts again, so the mix keeps its weights,
    as `interleave_datasets(stopping_strategy="all_exhausted")` does). The Trainer starts the
    next pass (`set_epoch`) until `max_steps`.
    """

    def __init__(self, config: Config, tokenizer: Any, plugins: SftPlugins) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.plugins = plugins
        self.options = TokenizeOptions(
            sequence_len=config.sequence_len,
            excess_length_strategy=config.excess_length_strategy,
            invalid_rows=config.invalid_rows,
            train_on_inputs=config.train_on_inputs,
            min_sample_len=config.min_sample_len or 0,
        )
        self.renders = [build_render(ds, tokenizer, config, plugins) for ds in config.datasets]
        self.packer = plugins.packers().get(config.sample_packer) if config.sample_packing else None
        self.stats = [
            SourceStats(name=redact(ds.path), strategy=ds.type or "pretokenized")
            for ds in config.datasets
        ]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) before each pass: reshuffles."""
        self.epoch = epoch

    def fingerprint(self) -> str:
        """The sources' metadata (files' sizes and dates, Hub commits), for resume checks."""
        parts = [
            quick_fingerprint(ds) or f"unknown:{redact(ds.path)}" for ds in self.config.datasets
        ]
        return "stream:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def summary_lines(self) -> list[str]:
        """What was read: one line per dataset (rows in, kept, dropped by reason)."""
        return [s.summary().rows_line() + f", {s.samples} samples" for s in self.stats]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        import numpy as np

        config = self.config
        rng = np.random.default_rng([config.seed, self.epoch])
        held = config.sample_packing or config.shuffles_samples
        size = config.streaming_multipack_buffer_size if held else 1
        buffer: list[Sample] = []
        empty = True
        for sample in self._mixed(self.epoch):
            buffer.append(sample)
            if len(buffer) >= size:
                yield from self._rows(buffer, rng)
                buffer, empty = [], False
        if buffer:
            yield from self._rows(buffer, rng)
        elif empty:
            raise DataError(
                "no training sample in the streamed data:\n"
                + "\n".join(f"  {line}" for line in self.summary_lines()),
                hint='check the files and field mappings (invalid_rows = "raise" names each bad row)',
            )

    def _rows(self, samples: list[Sample], rng: Any) -> list[dict[str, list[int]]]:
        """The buffered samples as training rows: packed when asked, shuffled when asked."""
        if self.packer is not None:
            lengths = [len(ids) for ids, _ in samples]
            bins = self.packer.pack(lengths, self.config.sequence_len, self.config, self.epoch)
            packed = PackedDataset(_Columns(samples), [list(b) for b in bins])
            rows = [packed[i] for i in range(len(packed))]
        else:
            rows = [{"input_ids": ids, "labels": labels} for ids, labels in samples]
        if self.config.shuffles_samples:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows

    def _mixed(self, epoch: int) -> Iterator[Sample]:
        """One pass over the datasets, mixed with probabilities proportional to `weight` (with
        `curriculum_sampling`: one after the other, in config order)."""
        count = len(self.config.datasets)
        if count == 1 or self.config.curriculum_sampling:
            for index in range(count):
                yield from self._samples(index)
            return
        import numpy as np

        rng = np.random.default_rng([self.config.seed, epoch, 1])
        weights = np.array([ds.weight for ds in self.config.datasets], dtype=float)
        streams = [self._samples(i) for i in range(count)]
        ended = [False] * count  # read to its end at least once in this pass
        produced = [False] * count  # gave a sample since it (re)started
        live = list(range(count))
        while live:
            chances = weights[live] / weights[live].sum()
            index = live[int(rng.choice(len(live), p=chances))]
            try:
                sample = next(streams[index])
            except StopIteration:
                ended[index] = True
                if all(ended):
                    return
                if not produced[index]:  # nothing to repeat: leave the mix
                    live.remove(index)
                else:
                    streams[index], produced[index] = self._samples(index), False
                continue
            produced[index] = True
            yield sample

    def _samples(self, index: int) -> Iterator[Sample]:
        """One dataset's samples in row order, tokenised a chunk of rows at a time."""
        ds = self.config.datasets[index]
        stats = self.stats[index]
        rows = iter_rows(ds, self.config.invalid_rows, stats)
        for number, chunk in enumerate(_batched(rows, CHUNK_ROWS)):
            result = process_chunk(
                [row for row, _, _ in chunk], 0, self.renders[index], self.tokenizer, self.options
            )
            if number:  # a key that fails every row is judged on the first chunk only
                result.blamed.clear()
            files = list(dict.fromkeys(file for _, file, _ in chunk))
            raw = RawRows(
                name=ds.path,
                rows=[row for row, _, _ in chunk],
                locations=[(files.index(file), n) for _, file, n in chunk],
                files=files,
                fingerprint="",
            )
            raise_row_problems(result, raw, f"datasets[{index}]", self.config.source)
            stats.rows_kept += len(set(result.sources))
            stats.samples += len(result.input_ids)
            stats.dropped.update(result.dropped)
            stats.notes.update(result.notes)
            stats.tokens += sum(len(ids) for ids in result.input_ids)
            stats.trainable_tokens += sum(
                sum(1 for label in labels if label != IGNORE_INDEX) for labels in result.labels
            )
            # Samples in row order, as the prepared path keeps them (`pipeline._as_arrays`).
            for i in sorted(range(len(result.sources)), key=result.sources.__getitem__):
                yield result.input_ids[i], result.labels[i]


def _batched(items: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


# -- what a run needs -------------------------------------------------------------------------


def prepare_streaming(
    config: Config, tokenizer: Any, plugins: SftPlugins, prepare: Any
) -> Prepared:
    """The training stream, and the `test_datasets` prepared as without streaming (in memory,
    cached like any prepared data) by `prepare(config)`: an eval set is small, and evaluating
    the same samples each time needs it whole."""
    summary = Summary()
    eval_data = None
    if config.test_datasets:
        eval_config = attrs.evolve(
            config,
            datasets=config.test_datasets,
            test_datasets=(),
            streaming=False,
            val_set_size=0.0,
            shuffle_merged_datasets=False,
        )
        prepared_eval = prepare(eval_config)
        eval_data = prepared_eval.train
        summary.eval_datasets = prepared_eval.summary.datasets
        summary.eval_samples = len(eval_data)
    return Prepared(
        train=StreamingDataset(config, tokenizer, plugins), eval=eval_data, summary=summary
    )


def run_samples(config: Config) -> int:
    """The samples (or packed rows) `max_steps` consumes over all processes: the length the
    Trainer's arguments are computed from, so a "per epoch" key means "per run"."""
    from sft.distributed import world_size

    steps = config.max_steps or 1
    return steps * config.micro_batch_size * config.gradient_accumulation_steps * world_size()


def dataloader_settings(config: Config) -> dict[str, Any]:
    """The `TrainingArguments` a streaming run needs: batches that are not dispatched.

    What accelerate's `prepare_data_loader` does with an `IterableDataset` (accelerate 1.x, as
    the Trainer calls it): by default (`dispatch_batches=None`) it *dispatches* — process 0
    alone iterates the data, concatenates one batch per process and sends each its slice; the
    concatenation fails on batches of different widths, which our collator makes (it pads to
    the longest row of each batch). With `dispatch_batches=False` every process iterates the
    dataset itself and `IterableDatasetShard` keeps, of each run of `processes × batch size`
    samples, its own batch: process k gets batches k, k + n, ... (a `datasets.IterableDataset`
    with at least n shards is given whole shards instead). So the ranks see disjoint data that
    together cover the stream, in step with each other, provided every process reads the same
    stream in the same order — which the seeded reading, mixing, packing and shuffling here
    guarantee. Splitting by rank in the dataset as well would split twice and train on 1/n of
    the data. The price: every process reads and tokenises the whole stream (tokenising runs
    at thousands of rows a second, far ahead of training).
    """
    if not config.streaming:
        return {}
    return {"accelerator_config": {"dispatch_batches": False}}


def debug_preview(config: Config, tokenizer: Any, plugins: SftPlugins, count: int) -> list[Any]:
    """`sft preprocess --debug` under streaming: the first `count` rows of each dataset, read
    lazily, shown and self-checked by `sft.data.debug` exactly as without streaming."""
    import tempfile

    from sft.data.debug import debug_examples

    with tempfile.TemporaryDirectory(prefix="sft-preview-") as tmp:
        heads, names = [], {}
        for index, ds in enumerate(config.datasets):
            file = Path(tmp) / f"{index}.jsonl"
            stats = SourceStats(name=ds.path, strategy="")
            rows = itertools.islice(iter_rows(ds, "skip", stats), count)
            # ensure_ascii: a lone surrogate stays an escape, which reads back as it was.
            file.write_text("".join(json.dumps(row, default=str) + "\n" for row, _, _ in rows))
            names[str(file)] = ds.path
            heads.append(
                attrs.evolve(
                    ds,
                    path=str(file),
                    ds_type="jsonl",
                    data_files=None,
                    shards=None,
                    shards_idx=None,
                )
            )
        examples = debug_examples(
            attrs.evolve(config, datasets=tuple(heads)), tokenizer, plugins, count
        )
    return [attrs.evolve(e, dataset=names.get(e.dataset, e.dataset)) for e in examples]


__all__ = [
    "CHUNK_ROWS",
    "SourceStats",
    "StreamingDataset",
    "dataloader_settings",
    "debug_preview",
    "iter_rows",
    "prepare_streaming",
    "run_samples",
]
