"""The preparation pipeline: lengths, bad rows, mixing, dedup, splits, cache, parallelism."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from sft.data import pipeline
from sft.data.pipeline import prepare_datasets
from sft.errors import ConfigError, DataError

ALPACA = '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "alpaca"\n'


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Say number {i}.", "input": "", "output": f"The number is {i}."}
        for i in range(start, start + n)
    ]


def prepare(config, tokenizer, **kwargs):
    return prepare_datasets(config, tokenizer, show_progress=False, **kwargs)


@pytest.mark.parametrize(
    ("strategy", "kept", "dropped"),
    [("drop", 1, {"longer than sequence_len": 1}), ("truncate", 2, {})],
)
def test_excess_length_strategies(make_config, tokenizer, tmp_path, strategy, kept, dropped):
    rows = [*alpaca_rows(1), {"instruction": "Repeat.", "input": "", "output": "la " * 200}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    config = make_config(f'sequence_len = 160\nexcess_length_strategy = "{strategy}"\n' + ALPACA)
    prepared = prepare(config, tokenizer)
    assert len(prepared.train) == kept
    assert prepared.summary.datasets[0].dropped == dropped
    assert all(len(r["input_ids"]) <= 160 for r in prepared.train)


def test_min_sample_len_drops_short_samples_and_counts_them(make_config, tokenizer, tmp_path):
    rows = [*alpaca_rows(2), {"instruction": "Explain.", "input": "", "output": "word " * 60}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    lengths = sorted(len(r["input_ids"]) for r in prepare(make_config(ALPACA), tokenizer).train)
    assert len(lengths) == 3
    config = make_config(f"min_sample_len = {lengths[1] + 1}\n" + ALPACA)
    prepared = prepare(config, tokenizer)
    assert [len(r["input_ids"]) for r in prepared.train] == [lengths[2]]
    assert prepared.summary.datasets[0].dropped == {"shorter than min_sample_len": 2}


def test_excess_length_raise_names_the_row(make_config, tokenizer, tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl", [*alpaca_rows(2), {"instruction": "x", "output": "la " * 200}]
    )
    config = make_config('sequence_len = 160\nexcess_length_strategy = "raise"\n' + ALPACA)
    with pytest.raises(DataError) as error:
        prepare(config, tokenizer)
    assert error.value.row == 3 and "sequence_len" in str(error.value)


def test_truncation_that_leaves_nothing_trainable_drops_and_counts(
    make_config, tokenizer, tmp_path
):
    write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "word " * 100, "output": "yes"}, *alpaca_rows(1)]
    )
    config = make_config('sequence_len = 90\nexcess_length_strategy = "truncate"\n' + ALPACA)
    prepared = prepare(config, tokenizer)
    assert len(prepared.train) == 1
    assert prepared.summary.datasets[0].dropped == {"no trainable tokens": 1}


def test_malformed_rows_raise_with_file_row_field_or_are_skipped_by_reason(
    make_config, tokenizer, tmp_path
):
    rows = [*alpaca_rows(2), {"instruction": "no output"}, {"instruction": 5, "output": "x"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError) as error:
        prepare(make_config(ALPACA), tokenizer)
    assert (error.value.file, error.value.row, error.value.field) == (str(path), 3, "output")
    assert "missing field 'output'" in str(error.value)
    prepared = prepare(make_config('invalid_rows = "skip"\n' + ALPACA), tokenizer)
    assert len(prepared.train) == 2
    assert prepared.summary.datasets[0].dropped == {"missing field": 1, "wrong type": 1}


def test_mixing_is_seeded_and_val_split_is_deterministic(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows(20, start=100))
    text = ALPACA + '[[datasets]]\npath = "{tmp}/b.jsonl"\ntype = "alpaca"\n'
    first = prepare(make_config("val_set_size = 0.25\n" + text), tokenizer)
    again = prepare(make_config("val_set_size = 0.25\n" + text), tokenizer)
    other = prepare(make_config("val_set_size = 0.25\nseed = 7\n" + text), tokenizer)
    assert (len(first.train), len(first.eval)) == (30, 10)
    assert first.train["input_ids"] == again.train["input_ids"]
    assert first.eval["input_ids"] == again.eval["input_ids"]
    assert first.train["input_ids"] != other.train["input_ids"]
    train = {tuple(x) for x in first.train["input_ids"]}
    assert not train & {tuple(x) for x in first.eval["input_ids"]}
    counted = prepare(make_config("val_set_size = 4\n" + text), tokenizer)
    assert len(counted.eval) == 4
    unshuffled = prepare(make_config("shuffle_merged_datasets = false\n" + text), tokenizer)
    decoded = tokenizer.decode(unshuffled.train[0]["input_ids"])
    assert "Say number 0." in decoded


def test_val_set_size_too_large_is_a_clear_error(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    with pytest.raises(DataError, match="val_set_size"):
        prepare(make_config("val_set_size = 3\n" + ALPACA), tokenizer)


def test_test_datasets_are_the_eval_set(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    write_jsonl(tmp_path / "t.jsonl", alpaca_rows(2, start=50))
    config = make_config(ALPACA + '[[test_datasets]]\npath = "{tmp}/t.jsonl"\ntype = "alpaca"\n')
    prepared = prepare(config, tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (5, 2)
    assert "Say number 50." in tokenizer.decode(prepared.eval[0]["input_ids"])


def test_exact_deduplication(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3) + alpaca_rows(2))
    prepared = prepare(make_config("dataset_exact_deduplication = true\n" + ALPACA), tokenizer)
    assert len(prepared.train) == 3 and prepared.summary.duplicates == 2


def test_cache_is_reused_without_tokenising_and_invalidated_by_changes(
    make_config, tokenizer, tmp_path, monkeypatch
):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    text = 'dataset_prepared_path = "{tmp}/cache"\n' + ALPACA
    first = prepare(make_config(text), tokenizer)
    assert not first.from_cache and (first.cache_dir / "complete").exists()

    calls = []
    real = pipeline.tokenize_rows
    monkeypatch.setattr(pipeline, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = prepare(make_config(text), tokenizer)
    assert second.from_cache and not calls
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.summary == first.summary

    changed_key = prepare(make_config(text, "sequence_len=1024"), tokenizer)
    assert not changed_key.from_cache and changed_key.cache_dir != first.cache_dir
    from sft.testing import build_tokenizer

    other_tokenizer = build_tokenizer(eos_token="<|end|>", add_bos=True)
    assert not prepare(make_config(text), other_tokenizer).from_cache
    write_jsonl(path, alpaca_rows(5))
    assert not prepare(make_config(text), tokenizer).from_cache
    assert len(calls) == 3


# A changed value for each root key the cache key reads: a key added to it needs one here.
CACHE_KEY_CHANGES = {
    "sequence_len": "sequence_len = 1024",
    "excess_length_strategy": 'excess_length_strategy = "truncate"',
    "min_sample_len": "min_sample_len = 2",
    "invalid_rows": 'invalid_rows = "skip"',
    "train_on_inputs": "train_on_inputs = true",
    "val_set_size": "val_set_size = 0.5",
    "seed": "seed = 7",
    "shuffle_merged_datasets": "shuffle_merged_datasets = false",
    "curriculum_sampling": "curriculum_sampling = true",
    "dataset_exact_deduplication": "dataset_exact_deduplication = true",
    "special_tokens": 'special_tokens = { pad_token = "<pad>" }',
    "tokens": 'tokens = ["<new>"]',
    "tokenizer_type": 'tokenizer_type = "PreTrainedTokenizerFast"',
    "tokenizer_legacy": "tokenizer_legacy = true",
}


def cache_key_of(make_config, tokenizer, plugins, root: str = "", dataset: str = "") -> str:
    config = make_config(root + "\n" + ALPACA + dataset + "\n", machine_checks=False)
    return pipeline.cache_key(config, tokenizer, ["data fingerprint"], plugins)


def test_every_root_key_of_the_cache_key_is_changed_by_a_test():
    assert set(CACHE_KEY_CHANGES) == set(pipeline._RELEVANT_ROOT_KEYS)


@pytest.mark.parametrize(
    ("root", "dataset"),
    [
        *((line, "") for line in CACHE_KEY_CHANGES.values()),
        ('default_system_message = "Be brief."', ""),  # a plugin's root key
        ("", 'system_prompt = "Be brief."'),  # a plugin's dataset key
    ],
    ids=[*CACHE_KEY_CHANGES, "plugin root key", "plugin dataset key"],
)
def test_the_cache_key_changes_with_every_key_that_changes_the_data(
    make_config, tokenizer, plugins, root, dataset
):
    before = cache_key_of(make_config, tokenizer, plugins)
    assert cache_key_of(make_config, tokenizer, plugins) == before  # nothing else moves it
    assert cache_key_of(make_config, tokenizer, plugins, root, dataset) != before


def test_parallel_tokenising_gives_the_same_result(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(600))
    serial = prepare(make_config("dataset_num_proc = 1\n" + ALPACA), tokenizer)
    parallel = prepare(make_config("dataset_num_proc = 2\n" + ALPACA), tokenizer)
    assert serial.train["input_ids"] == parallel.train["input_ids"]
    assert serial.train["labels"] == parallel.train["labels"]


@pytest.mark.parametrize("procs", [1, 2])
def test_rows_are_read_as_they_are_tokenised_never_a_whole_source(
    make_config, tokenizer, tmp_path, monkeypatch, procs
):
    import sft.data.rows as rows_module

    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3000))  # 12 chunks of 256 rows
    read = [0]
    real_iter_rows = rows_module.iter_rows

    def counting(*args, **kwargs):
        for located in real_iter_rows(*args, **kwargs):
            read[0] += 1
            yield located

    def never(*args, **kwargs):
        raise AssertionError("a local file is read lazily, not whole")

    ahead = []
    real_chunks = pipeline._chunks

    def watched(rows, places):
        for first, chunk in real_chunks(rows, places):
            ahead.append(read[0] - first)  # rows read but not yet handed out
            yield first, chunk

    monkeypatch.setattr(rows_module, "iter_rows", counting)
    monkeypatch.setattr(pipeline, "read_rows", never)
    monkeypatch.setattr(pipeline, "_chunks", watched)
    prepared = prepare(make_config(f"dataset_num_proc = {procs}\n" + ALPACA), tokenizer)
    assert len(prepared.train) == 3000 and read[0] == 3000
    assert len(ahead) == 12 and max(ahead) == pipeline.CHUNK_ROWS  # one chunk at a time
    # Samples live in an Arrow file, memory-mapped: not in the Python heap.
    assert prepared.train.cache_files and not prepared.train._indices


def test_weights_dedup_split_and_shuffle_select_the_same_samples_as_lists_would(
    make_config, tokenizer, tmp_path
):
    """The index arithmetic against a plain-Python model of the documented behaviour."""
    import numpy as np

    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40) + alpaca_rows(10))  # 10 duplicates
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows(20, start=100))
    text = (
        "seed = 5\nval_set_size = 0.2\ndataset_exact_deduplication = true\n"
        + ALPACA
        + '[[datasets]]\npath = "{tmp}/b.jsonl"\ntype = "alpaca"\nweight = 1.5\n'
    )
    config = make_config(text)
    prepared = prepare(config, tokenizer)
    unshuffled = "shuffle_merged_datasets = false\n"
    one = prepare(make_config(unshuffled + ALPACA), tokenizer).train
    two = prepare(make_config(unshuffled + ALPACA.replace("a.jsonl", "b.jsonl")), tokenizer).train
    samples = [tuple(r) for r in one["input_ids"]]
    extra = sorted(np.random.default_rng(5 + 1).choice(20, size=10, replace=False).tolist())
    b_samples = [tuple(r) for r in two["input_ids"]]
    samples += b_samples + [b_samples[i] for i in extra]
    unique = list(dict.fromkeys(samples))
    order = np.random.default_rng(5).permutation(len(unique))
    held = set(np.random.default_rng(6).permutation(len(unique))[: round(len(unique) * 0.2)])
    expected_train = [unique[i] for i in order.tolist() if i not in held]
    expected_eval = [unique[i] for i in sorted(held)]
    assert [tuple(r) for r in prepared.train["input_ids"]] == expected_train
    assert [tuple(r) for r in prepared.eval["input_ids"]] == expected_eval
    assert prepared.summary.duplicates == len(samples) - len(unique) == 10 + 10


def test_summary_counts(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    summary = prepare(make_config(ALPACA), tokenizer).summary.datasets[0]
    assert (summary.rows_in, summary.rows_kept, summary.samples) == (4, 4, 4)
    assert 0.1 < summary.trainable_share < 0.6
    assert summary.length_percentiles["max"] >= summary.length_percentiles["p50"] > 0


def test_cache_follows_plugin_keys_and_template_file_contents(make_config, tmp_path):
    from sft.plugins.chat_template.templates import builtin_template
    from sft.testing import build_tokenizer

    tokenizer = build_tokenizer(
        special_tokens=["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>"
    )
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    template = tmp_path / "t.jinja"
    template.write_text(builtin_template("chatml"))
    text = (
        'dataset_prepared_path = "{tmp}/cache"\nchat_template = "jinja"\nchat_template_jinja = "{tmp}/t.jinja"\n'
        '[[datasets]]\npath = "{tmp}/c.jsonl"\ntype = "chat_template"\n'
    )
    assert not prepare(make_config(text), tokenizer).from_cache
    assert prepare(make_config(text), tokenizer).from_cache
    assert not prepare(
        make_config('default_system_message = "Be brief."\n' + text), tokenizer
    ).from_cache
    template.write_text(builtin_template("chatml").replace("<|im_start|>", "<|im_start|> "))
    assert not prepare(make_config(text), tokenizer).from_cache


def test_the_cache_keys_never_read_a_data_file_whole(make_config, tokenizer, tmp_path, monkeypatch):
    """A data file is identified by its metadata or by the hash its reader computes, never
    read into memory a second time for a key (an 850 MiB JSONL used to be, twice); a cache hit
    opens no data file at all."""
    import builtins
    import io
    import os

    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    text = 'dataset_prepared_path = "{tmp}/cache"\n' + ALPACA
    whole_reads = []
    real_read_bytes = pipeline.Path.read_bytes

    def read_bytes(self):
        whole_reads.append(str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pipeline.Path, "read_bytes", read_bytes)
    assert not prepare(make_config(text), tokenizer).from_cache
    assert str(path) not in whole_reads

    opened = []
    real_open = io.open

    def recording_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(builtins, "open", recording_open)
    assert prepare(make_config(text), tokenizer).from_cache
    assert str(path) not in opened


def test_key_file_digests_are_streamed_and_equal_the_whole_file_hash(tmp_path):
    import hashlib

    data = bytes(range(256)) * (3 * 4096 + 7)  # a few blocks and a partial one
    (tmp_path / "big.bin").write_bytes(data)
    described = pipeline._files_described(
        {"a": [str(tmp_path / "big.bin"), "text"]}, pipeline._content_digest, skip=set()
    )
    assert described == {
        "a": [
            {"file": str(tmp_path / "big.bin"), "sha256": hashlib.sha256(data).hexdigest()},
            "text",
        ]
    }


def test_a_lone_surrogate_is_a_bad_row_not_a_tokenizer_crash(make_config, tokenizer, tmp_path):
    import json

    bad = {"instruction": "Say it.", "input": "", "output": "bad \ud800 text"}
    rows = [*alpaca_rows(2), bad, *alpaca_rows(1, start=5)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # "\ud800" escaped: valid JSON
    with pytest.raises(DataError) as error:
        prepare(make_config(ALPACA), tokenizer)
    assert (error.value.file, error.value.row, error.value.field) == (str(path), 3, "output")
    assert "lone surrogate '\\ud800'" in str(error.value)
    prepared = prepare(make_config('invalid_rows = "skip"\n' + ALPACA), tokenizer)
    assert len(prepared.train) == 3  # the rest of the batch is tokenised
    assert prepared.summary.datasets[0].dropped == {"invalid text": 1}


def test_no_sample_left_says_per_dataset_what_was_read_and_dropped(
    make_config, tokenizer, tmp_path
):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "la " * 200}] * 2)
    (tmp_path / "b.jsonl").write_text("")
    config = make_config(
        "sequence_len = 64\nval_set_size = 0.1\n"
        + ALPACA
        + '[[datasets]]\npath = "{tmp}/b.jsonl"\ntype = "alpaca"\n'
    )
    with pytest.raises(DataError) as error:
        prepare(config, tokenizer)
    text = str(error.value)
    assert "no training sample left after preparing the data" in text
    assert f"{tmp_path}/a.jsonl: 2 rows in, 0 kept, dropped: longer than sequence_len: 2" in text
    assert f"{tmp_path}/b.jsonl: 0 rows in, 0 kept" in text
    assert "fix: raise sequence_len" in text


def completion_rows(tag: str, count: int) -> list[dict]:
    return [{"text": f"{tag} row {i}."} for i in range(count)]


def test_dataset_weights_repeat_and_subsample_each_source(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", completion_rows("Alpha", 10))
    write_jsonl(tmp_path / "b.jsonl", completion_rows("Beta", 10))
    text = (
        "shuffle_merged_datasets = false\n"
        '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "completion"\nweight = 2\n'
        '[[datasets]]\npath = "{tmp}/b.jsonl"\ntype = "completion"\nweight = 0.5\n'
    )
    prepared = prepare(make_config(text), tokenizer)
    texts = [tokenizer.decode(r["input_ids"], skip_special_tokens=True) for r in prepared.train]
    alpha = [t for t in texts if t.startswith("Alpha")]
    beta = [t for t in texts if t.startswith("Beta")]
    assert len(alpha) == 20 and all(alpha.count(t) == 2 for t in set(alpha))  # each twice
    assert len(beta) == 5 and len(set(beta)) == 5  # a seeded half, no repeats
    again = prepare(make_config(text), tokenizer, use_cache=False)
    assert [r["input_ids"] for r in again.train] == [r["input_ids"] for r in prepared.train]
    notes = prepared.summary.datasets[0].notes
    assert notes == {"weight 2: samples used": 20}


def test_shards_take_one_contiguous_piece(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", completion_rows("Alpha", 10))
    text = (
        "shuffle_merged_datasets = false\n"
        '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "completion"\nshards = 3\nshards_idx = 1\n'
    )
    prepared = prepare(make_config(text), tokenizer)
    texts = [tokenizer.decode(r["input_ids"], skip_special_tokens=True) for r in prepared.train]
    assert texts == ["Alpha row 4.", "Alpha row 5.", "Alpha row 6."]  # as datasets' shard cuts
    with pytest.raises(ConfigError, match="only 3 shards"):
        make_config(text.replace("shards_idx = 1", "shards_idx = 3"))
    with pytest.raises(ConfigError, match="shards and shards_idx go together"):
        make_config(text.replace("shards_idx = 1\n", ""))


def test_gathered_samples_are_read_from_every_batch_of_every_file_in_order(tmp_path):
    """The shuffled copy reads each sample by its place in the file (not through a mapping):
    samples from several record batches of several files, repeated and in any order."""
    import itertools

    import numpy as np
    from datasets.arrow_writer import ArrowWriter

    rng = np.random.default_rng(0)
    samples, paths = [], []
    for number in range(2):
        paths.append(tmp_path / f"source-{number}.arrow")
        writer = ArrowWriter(features=pipeline._features(), path=str(paths[-1]))
        for _ in range(3):  # record batches
            lengths = rng.integers(1, 40, 5)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            ids = rng.integers(0, 50_000, offsets[-1]).astype(np.int32)
            labels = np.where(rng.random(offsets[-1]) < 0.3, -100, ids).astype(np.int32)
            chunk = pipeline.SampleArrays(ids, labels, offsets, len(lengths), None)
            writer.write_table(pipeline._arrow_table([chunk]))
            samples += [
                (ids[a:b].tolist(), labels[a:b].tolist()) for a, b in itertools.pairwise(offsets)
            ]
        writer.finalize()
        writer.close()
    indices = np.concatenate([rng.permutation(len(samples)), [7, 7, 29, 0]])
    sources = pipeline._SampleFiles(paths)
    try:
        table = sources.table(indices)
    finally:
        sources.close()
    assert table.column("input_ids").to_pylist() == [samples[i][0] for i in indices]
    assert table.column("labels").to_pylist() == [samples[i][1] for i in indices]


def test_the_copy_is_the_same_whatever_the_batches_it_is_gathered_in(
    make_config, tokenizer, tmp_path, monkeypatch
):
    """Long samples are gathered fewer at a time (at most GATHER_TOKENS tokens): a sample
    longer than that on its own, and batches cut by rows or by tokens, give the same data."""
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows(20, start=100))
    text = ALPACA + '[[datasets]]\npath = "{tmp}/b.jsonl"\ntype = "alpaca"\nweight = 1.5\n'
    expected = prepare(make_config("val_set_size = 0.1\n" + text), tokenizer)
    assert len(expected.train) > 2 * 3
    for rows, tokens in ((3, 1 << 22), (4096, 50), (4096, 1)):
        monkeypatch.setattr(pipeline, "GATHER_ROWS", rows)
        monkeypatch.setattr(pipeline, "GATHER_TOKENS", tokens)
        prepared = prepare(make_config("val_set_size = 0.1\n" + text), tokenizer)
        assert prepared.train.data.table.equals(expected.train.data.table)
        assert prepared.eval.data.table.equals(expected.eval.data.table)
