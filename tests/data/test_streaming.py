"""`streaming = true`: the same samples as the prepared path, read lazily, mixed, packed,
split between processes; its config checks, `sft preprocess` and a real run."""

from __future__ import annotations

import itertools
import json

import pytest
from conftest import write_jsonl

from sft.data import pipeline, sources
from sft.data.pipeline import prepare_datasets
from sft.data.sources import read_rows
from sft.data.streaming import CHUNK_ROWS, SourceStats, StreamingDataset, iter_rows
from sft.errors import ConfigError, DataError

IGNORE = -100
STREAM = "streaming = true\nmax_steps = 5\n"


def alpaca_rows(n: int, tag: str = "") -> list[dict]:
    return [
        {
            "instruction": f"Say {tag}number {i}.",
            "input": "",
            "output": f"It is {i}." + " ok" * (i % 7),
        }
        for i in range(n)
    ]


def dataset_toml(name: str, kind: str = "alpaca", extra: str = "") -> str:
    return f'[[datasets]]\npath = "{{tmp}}/{name}"\ntype = "{kind}"\n{extra}'


def samples_of(rows) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in rows]


def test_streamed_samples_equal_the_prepared_ones(make_config, tokenizer, plugins, tmp_path):
    rows = alpaca_rows(150)
    rows[3] = {"instruction": "no output field"}  # a bad row: skipped and counted by both
    rows[7] = {"instruction": "Repeat.", "input": "", "output": "la " * 300}  # too long: dropped
    write_jsonl(tmp_path / "a.jsonl", rows)
    with (tmp_path / "a.jsonl").open("a") as handle:
        handle.write("{not json\n")
    common = 'sequence_len = 128\ninvalid_rows = "skip"\nshuffle_merged_datasets = false\n'
    prepared = prepare_datasets(
        make_config(common + dataset_toml("a.jsonl")), tokenizer, plugins, show_progress=False
    )
    stream = StreamingDataset(
        make_config(STREAM + common + dataset_toml("a.jsonl")), tokenizer, plugins
    )

    assert samples_of(stream) == samples_of(prepared.train)  # same ids, same labels, same order
    stats, summary = stream.stats[0].summary(), prepared.summary.datasets[0]
    assert (stats.rows_in, stats.rows_kept, stats.dropped) == (
        summary.rows_in,
        summary.rows_kept,
        summary.dropped,
    )
    assert stats.trainable_tokens == summary.trainable_tokens


@pytest.mark.parametrize(
    "fmt", ["jsonl", "jsonl.gz", "json", "csv", "parquet", "arrow", "txt", "saved"]
)
def test_rows_are_read_lazily_as_read_rows_reads_them(make_config, tmp_path, fmt):
    import datasets

    rows = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(150)]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "jsonl.gz":
        import gzip

        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "parquet":
        table.to_parquet(str(path))
    elif fmt == "arrow":
        import pyarrow as pa

        with pa.ipc.new_file(str(path), table.data.schema) as writer:
            for batch in table.data.table.to_batches(max_chunksize=40):
                writer.write_batch(batch)
    elif fmt == "txt":
        path.write_text("".join(f"line {i}\n" for i in range(150)) + "\n\n")
    else:
        table.save_to_disk(str(path))
    config = make_config(STREAM + f'[[datasets]]\npath = "{path}"\ntype = "alpaca"\n')
    ds = config.datasets[0]
    stats = SourceStats(name="d", strategy="alpaca")
    streamed = list(iter_rows(ds, "raise", stats))
    raw = read_rows(ds)
    assert [row for row, _, _ in streamed] == raw.rows
    assert [raw.where(i) for i in range(len(raw.rows))] == [(f, n) for _, f, n in streamed]
    assert stats.rows_in == len(raw.rows)


def test_a_bad_line_names_its_file_and_line(make_config, tokenizer, plugins, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    with path.open("a") as handle:
        handle.write("[1, 2]\n")
    stream = StreamingDataset(make_config(STREAM + dataset_toml("a.jsonl")), tokenizer, plugins)
    with pytest.raises(DataError) as caught:
        list(stream)
    assert (caught.value.file, caught.value.row) == (str(path), 6)
    assert "JSON object" in str(caught.value)


def test_a_key_that_fails_every_row_is_a_config_error(make_config, tokenizer, plugins, tmp_path):
    rows = [{"conversations": [{"role": "user", "content": "hi"}]}] * 5
    write_jsonl(tmp_path / "c.jsonl", rows)
    text = 'chat_template = "chatml"\ninvalid_rows = "skip"\n'
    config = make_config(STREAM + text + dataset_toml("c.jsonl", "chat_template"))
    with pytest.raises(ConfigError) as caught:
        list(StreamingDataset(config, tokenizer, plugins))
    (problem,) = caught.value.problems
    assert problem.path == "datasets[0].field_messages"
    assert "conversations" in problem.message


def test_memory_stays_bounded_by_the_buffer(make_config, tokenizer, plugins, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("streaming read a whole dataset")

    monkeypatch.setattr(sources, "read_rows", never)
    monkeypatch.setattr(pipeline, "read_rows", never)
    total, buffer = 3000, 100
    write_jsonl(tmp_path / "big.jsonl", alpaca_rows(total))
    config = make_config(
        STREAM
        + f"streaming_multipack_buffer_size = {buffer}\nsample_packing = true\nsequence_len = 256\n"
        + dataset_toml("big.jsonl")
    )
    stream = StreamingDataset(config, tokenizer, plugins)
    iterator = iter(stream)
    first = list(itertools.islice(iterator, 5))
    assert len(first) == 5
    # Rows pulled so far: one buffer of samples, rounded up to whole chunks of rows.
    assert stream.stats[0].rows_in <= buffer + CHUNK_ROWS < total
    rest = list(iterator)
    assert stream.stats[0].rows_in == total  # and the whole file, once, by the end of the pass
    consumed = sum(row["position_ids"].count(0) for row in first + rest)
    assert consumed == stream.stats[0].samples == total


def test_packed_rows_fit_and_hold_exactly_the_streamed_samples(
    make_config, tokenizer, plugins, tmp_path
):
    from sft.data.collate import Collator

    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(300))
    common = "sequence_len = 1024\nstreaming_multipack_buffer_size = 70\n"
    unpacked = StreamingDataset(
        make_config(
            STREAM + common + "shuffle_merged_datasets = false\n" + dataset_toml("a.jsonl")
        ),
        tokenizer,
        plugins,
    )
    packed_config = make_config(
        STREAM + common + "sample_packing = true\n" + dataset_toml("a.jsonl")
    )
    packed = list(StreamingDataset(packed_config, tokenizer, plugins))

    pieces = []
    for row in packed:
        assert len(row["input_ids"]) <= 1024
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert starts[0] == 0
        for start, stop in itertools.pairwise(starts):
            assert row["position_ids"][start:stop] == list(range(stop - start))
            pieces.append((tuple(row["input_ids"][start:stop]), tuple(row["labels"][start:stop])))
    # Each sample once, its first label masked (never predicted from the previous sample).
    expected = [(ids, (IGNORE, *labels[1:])) for ids, labels in samples_of(unpacked)]
    assert sorted(pieces) == sorted(expected)
    assert len(packed) < len(expected) / 2  # it packs
    batch = Collator(pad_id=0)(packed[:2])  # the collator's packed format: no attention_mask
    assert "position_ids" in batch and "attention_mask" not in batch


def test_weights_mix_datasets_in_proportion(make_config, tokenizer, plugins, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(400, "A "))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows(100, "B "))
    config = make_config(
        STREAM
        + "shuffle_merged_datasets = false\n"
        + dataset_toml("a.jsonl", extra="weight = 3\n")
        + dataset_toml("b.jsonl")
    )
    a_prefix = tokenizer("Say A", add_special_tokens=False)["input_ids"]

    def from_a(row) -> bool:
        text = tokenizer.decode(row["input_ids"])
        return "Say A number" in text

    assert a_prefix  # the tokenizer reads the tag
    stream = StreamingDataset(config, tokenizer, plugins)
    rows = list(stream)
    head = [from_a(row) for row in rows[:200]]
    assert 0.65 < sum(head) / len(head) < 0.85  # weight 3 : 1
    # A pass ends when both datasets were read to the end: the smaller one repeats meanwhile.
    assert sum(from_a(row) for row in rows) == 400
    assert sum(not from_a(row) for row in rows) >= 100
    assert samples_of(StreamingDataset(config, tokenizer, plugins)) == samples_of(rows)  # seeded


@pytest.mark.parametrize("packing", [False, True])
def test_curriculum_streams_the_datasets_one_after_the_other(
    make_config, tokenizer, plugins, tmp_path, packing
):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30, "A "))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows(20, "B "))
    config = make_config(
        STREAM
        + f"curriculum_sampling = true\nsample_packing = {str(packing).lower()}\n"
        + dataset_toml("a.jsonl")
        + dataset_toml("b.jsonl")
    )
    text = "".join(
        tokenizer.decode(row["input_ids"]) for row in StreamingDataset(config, tokenizer, plugins)
    )
    expected = [f"Say A number {i}." for i in range(30)] + [f"Say B number {i}." for i in range(20)]
    positions = [text.index(sample) for sample in expected]
    assert positions == sorted(positions)
    with pytest.raises(ConfigError, match=r"datasets\[1\]\.weight.*one after the other"):
        make_config(
            STREAM
            + "curriculum_sampling = true\n"
            + dataset_toml("a.jsonl")
            + dataset_toml("b.jsonl", extra="weight = 2\n")
        )


def test_shuffling_is_seeded_and_changes_with_the_pass(make_config, tokenizer, plugins, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(60))
    config = make_config(
        STREAM + "streaming_multipack_buffer_size = 30\n" + dataset_toml("a.jsonl")
    )
    first = samples_of(StreamingDataset(config, tokenizer, plugins))
    again = StreamingDataset(config, tokenizer, plugins)
    assert samples_of(again) == first
    again.set_epoch(1)
    second = samples_of(again)
    assert second != first and sorted(second) == sorted(first)
    # shuffled only within a buffer: the first 30 samples stay the first 30 rows
    assert sorted(second[:30]) == sorted(first[:30])


def test_hub_datasets_are_loaded_as_streams(make_config, tokenizer, plugins, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return iter(alpaca_rows(10))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = make_config(STREAM + '[[datasets]]\npath = "org/chat"\ntype = "alpaca"\nname = "x"\n')
    rows = list(StreamingDataset(config, tokenizer, plugins))
    assert len(rows) == 10
    assert calls == [
        (
            "org/chat",
            {
                "name": "x",
                "split": "train",
                "revision": None,
                "data_files": None,
                "storage_options": None,
                "streaming": True,
            },
        )
    ]


@pytest.mark.parametrize(
    ("text", "dataset_keys", "key"),
    [
        ("streaming = true\n", "", "max_steps"),
        (STREAM + "val_set_size = 0.1\n", "", "val_set_size"),
        (STREAM + "dataset_exact_deduplication = true\n", "", "dataset_exact_deduplication"),
        (STREAM, "shards = 2\nshards_idx = 0\n", "datasets[0].shards"),
    ],
)
def test_config_checks_name_the_key_and_the_fix(make_config, tmp_path, text, dataset_keys, key):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2))
    with pytest.raises(ConfigError) as caught:
        make_config(text + dataset_toml("a.jsonl", extra=dataset_keys))
    (problem,) = caught.value.problems
    assert problem.path == key and problem.hint
    assert "streaming" in problem.message


def test_num_epochs_with_streaming_is_a_warning_that_max_steps_decides(make_config, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2))
    config = make_config(STREAM + "num_epochs = 3\n" + dataset_toml("a.jsonl"))
    (warning,) = config.warnings
    assert warning.path == "num_epochs" and "the run lasts max_steps" in warning.message


def test_test_datasets_stay_allowed(make_config, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2))
    text = STREAM + dataset_toml("a.jsonl")
    config = make_config(text + '[[test_datasets]]\npath = "{tmp}/a.jsonl"\ntype = "alpaca"\n')
    assert config.streaming and config.test_datasets


def test_ranks_get_disjoint_batches_that_cover_the_stream(
    make_config, tokenizer, plugins, tmp_path, monkeypatch
):
    from accelerate.data_loader import IterableDatasetShard

    from sft import distributed
    from sft.train.run import training_arguments

    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(48))
    config = make_config(STREAM + "micro_batch_size = 2\n" + dataset_toml("a.jsonl"))
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        stream = StreamingDataset(config, tokenizer, plugins)
        # What the Trainer's data loader does under torchrun with dispatch_batches=False.
        shard = IterableDatasetShard(stream, batch_size=2, num_processes=2, process_index=rank)
        seen.append(samples_of(shard))
    whole = samples_of(StreamingDataset(config, tokenizer, plugins))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(whole) and len(whole) == 48
    # Dispatching (accelerate's default for an iterable) would fail on batches of unequal width.
    import torch

    args = training_arguments(config, 20, False, torch.float32)
    assert args.accelerator_config.dispatch_batches is False


def test_preprocess_has_nothing_to_prepare_and_debug_shows_rows(tiny_project, capsys, monkeypatch):
    from sft.cli import main

    tiny_project()  # writes the model, tokenizer and data
    tmp = tiny_project.tmp_path
    (tmp / "config.toml").write_text(
        f'base_model = "{tmp}/tiny"\nchat_template = "chatml"\noutput_dir = "{tmp}/out"\n'
        f'{STREAM}[[datasets]]\npath = "{tmp}/data.jsonl"\ntype = "chat_template"\n'
    )
    monkeypatch.setattr(pipeline, "prepare_datasets", None)  # never called
    assert main(["preprocess", str(tmp / "config.toml")]) == 0
    assert "nothing to prepare" in capsys.readouterr().out
    assert (
        main(["preprocess", str(tmp / "config.toml"), "--debug", "--debug-num-examples", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert f"{tmp}/data.jsonl, row 2" in out and "self-check: 2/2 examples passed" in out


@pytest.mark.parametrize("packing", [False, True])
def test_a_streaming_run_trains_max_steps_and_saves(tiny_project, capsys, packing):
    from sft.train.run import train

    extra = ["sample_packing=true", "sequence_len=256", "eval_steps=3"] if packing else []
    evals = '[[test_datasets]]\npath = "{tmp}/data.jsonl"\ntype = "chat_template"\n'
    result = train(tiny_project("streaming=true", "max_steps=3", *extra, text=evals * packing))
    assert result.global_step == 3
    assert (result.output_dir / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert f"data: streaming train / {24 * packing} eval samples" in out
    assert "steps: 3 (streaming)" in out and "data.jsonl: 24 rows in, 24 kept" in out
    records = (result.output_dir / "metrics.jsonl").read_text()
    assert ("eval_loss" in records) is packing  # test_datasets: prepared whole, evaluated


def test_a_resumed_streaming_run_replays_the_stream_to_its_step(tiny_project):
    import shutil

    from sft.train.run import train

    common = ("streaming=true", "adapter=lora", "max_steps=4", "save_steps=2")
    full = train(tiny_project(*common))
    losses = (full.output_dir / "metrics.jsonl").read_text().splitlines()
    for path in full.output_dir.iterdir():  # as if killed after checkpoint-2
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train(tiny_project(*common, "auto_resume_from_checkpoints=true"))
    assert resumed.resumed_from and resumed.global_step == 4

    def loss_at(lines: list[str], step: int) -> float:
        records = [json.loads(line) for line in lines]
        return next(r["loss"] for r in records if r.get("step") == step and "loss" in r)

    after = (resumed.output_dir / "metrics.jsonl").read_text().splitlines()
    assert loss_at(after, 4) == pytest.approx(loss_at(losses, 4), rel=1e-5)  # the same batches


@pytest.mark.slow
@pytest.mark.distributed
def test_two_streaming_processes_match_one_with_the_same_global_batch(tiny_project, tmp_path):
    """Real torchrun (gloo): if the processes saw overlapping or missing batches, or accelerate
    dispatched them, the weights would differ from one process accumulating both batches."""
    import os
    import subprocess
    import sys

    import torch
    from conftest import TINY_CONFIG
    from safetensors.torch import load_file

    exact = 'optimizer = "sgd"\nlr_scheduler = "constant"\nmax_grad_norm = 0\n'
    config = tmp_path / "config.toml"
    config.write_text(
        TINY_CONFIG.replace("{tmp}", str(tmp_path)).replace(
            "num_epochs = 1", exact + "streaming = true\nmax_steps = 3\n"
        )
    )

    def sft(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sft", "run", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ)

    one = sft("--set", f"output_dir={tmp_path / 'one'}", "--set", "gradient_accumulation_steps=2")
    assert one.returncode == 0, one.stderr
    two = sft("--nproc-per-node", "2", "--set", f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    assert "steps: 3 (streaming, 2 processes)" in two.stdout
    a, b = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    start = load_file(tmp_path / "tiny" / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# -- Axolotl's pretraining_dataset: streamed training datasets of type pretrain ---------------

PRETRAIN_YAML = """
base_model: unused
max_steps: 4
sequence_len: 64
pretrain_multipack_buffer_size: 50
pretraining_dataset:
  - path: {tmp}/text.jsonl
    text_column: body
"""


def load_yaml_config(text, plugins, tmp_path):
    from sft.config import load_config_text

    return load_config_text(
        text.replace("{tmp}", str(tmp_path)),
        fmt="yaml",
        plugins=plugins,
        source=str(tmp_path / "c.yml"),
    )


def text_rows(n: int) -> list[dict]:
    return [{"body": f"Document {i}. " + "words " * (i * 7 % 40)} for i in range(n)]


def test_pretraining_dataset_streams_its_text_column_all_trained(tokenizer, plugins, tmp_path):
    write_jsonl(tmp_path / "text.jsonl", text_rows(30))
    config = load_yaml_config(PRETRAIN_YAML, plugins, tmp_path)
    assert config.streaming is True and config.streaming_multipack_buffer_size == 50
    assert [ds.type for ds in config.datasets] == ["pretrain"]  # Axolotl's default type

    pretrain = StreamingDataset(config, tokenizer, plugins)
    completion = StreamingDataset(
        load_yaml_config(
            PRETRAIN_YAML.replace("text_column", "type: completion\n    field"),
            plugins,
            tmp_path,
        ),
        tokenizer,
        plugins,
    )
    samples = samples_of(pretrain)
    assert samples == samples_of(completion)  # the text of text_column, + EOS, as completion
    texts = [tokenizer.decode(list(ids)) for ids, _ in samples]
    assert any("Document 3. words words" in text for text in texts)
    bos = tokenizer.bos_token_id
    assert all(
        label == token
        for ids, labels in samples
        for token, label in zip(ids, labels, strict=True)
        if token != bos
    )  # every token trained (but BOS, which nothing predicts)
    assert all(len(ids) <= 64 for ids, _ in samples)  # long texts split, never dropped
    assert sum(1 for ids, _ in samples if ids[-1] == tokenizer.eos_token_id) == 30


@pytest.mark.parametrize(
    "extra, path, line, message",
    [
        (
            "datasets:\n  - path: x.jsonl\n    type: completion\n",
            "pretraining_dataset",
            6,
            "set together with datasets",
        ),
        ("streaming: false\n", "streaming", 9, "always streamed"),
        ("    text_colum: body\n", "pretraining_dataset[0].text_colum", 9, "unknown key"),
        ("    field_instruction: q\n", "pretraining_dataset[0].field_instruction", 9, "alpaca"),
    ],
)
def test_pretraining_dataset_problems_name_its_own_keys_and_lines(
    plugins, tmp_path, extra, path, line, message
):
    with pytest.raises(ConfigError) as error:
        load_yaml_config(PRETRAIN_YAML + extra, plugins, tmp_path)
    (problem,) = error.value.problems
    assert (problem.path, problem.line) == (path, line)
    assert message in problem.message


def test_a_pretraining_dataset_run_trains_and_saves_a_config_that_reloads(
    tiny_project, plugins, tmp_path
):
    from sft.config import load_config
    from sft.train.run import train

    tiny_project()  # writes the tiny model and tokenizer to {tmp}/tiny
    write_jsonl(tmp_path / "text.jsonl", text_rows(40))
    text = PRETRAIN_YAML.replace("base_model: unused", "base_model: {tmp}/tiny") + (
        "micro_batch_size: 2\nsample_packing: true\noutput_dir: {tmp}/out\nlearning_rate: 0.01\n"
    )
    (tmp_path / "c.yml").write_text(text.replace("{tmp}", str(tmp_path)))
    result = train(load_config(tmp_path / "c.yml", plugins=plugins))
    assert result.global_step == 4
    saved = load_config(result.output_dir / "sft_config.yaml", plugins=plugins)
    assert saved.streaming and [ds.type for ds in saved.datasets] == ["pretrain"]
