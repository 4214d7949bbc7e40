"""Resuming checks what changed since the checkpoint: data, batches, seed, adapter shape and the
optimizer / schedule are refused (listing each key, before the model loads) unless
`resume_allow_changes = true`, which really applies a new learning rate; an adapter-shape change
is a clear error, never a library traceback; harmless changes are a one-line note."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import tiny_rows, write_jsonl

from sft import api
from sft.errors import SftError

FIRST = ("adapter=lora", "lora_r=4", "max_steps=4", "save_steps=2", "warmup_steps=1")


def _flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


def _learning_rates(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}


@pytest.fixture
def checkpoint(tiny_project):
    """A LoRA run of 4 steps with checkpoints at steps 2 and 4; returns checkpoint-2."""
    api.train(tiny_project(*FIRST))
    return tiny_project.tmp_path / "out" / "checkpoint-2"


def _resume(tiny_project, checkpoint, *changes: str, out: str = "resumed"):
    return tiny_project(
        *FIRST,
        f"resume_from_checkpoint='{checkpoint}'",
        f"output_dir='{tiny_project.tmp_path / out}'",
        *changes,
    )


def test_every_checkpoint_records_the_config_and_a_data_fingerprint(tiny_project, checkpoint):
    saved = yaml.safe_load((checkpoint / "sft_config.yaml").read_text())
    assert saved["learning_rate"] == 0.01 and saved["lora_r"] == 4
    record = json.loads((checkpoint / "sft_data.json").read_text())
    assert len(record["data_fingerprint"]) == 32


def test_changed_data_batches_seed_and_learning_rate_are_refused_before_the_model_loads(
    tiny_project, checkpoint, monkeypatch
):
    import sft.model

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load when the resume is refused")

    monkeypatch.setattr(sft.model, "load_model", no_load)
    write_jsonl(tiny_project.tmp_path / "other.jsonl", tiny_rows(30))
    config = _resume(
        tiny_project,
        checkpoint,
        "learning_rate=0.05",
        "seed=7",
        "micro_batch_size=4",
        f"datasets[0].path='{tiny_project.tmp_path / 'other.jsonl'}'",
    )
    with pytest.raises(SftError) as refused:
        api.train(config)
    text = str(refused.value)
    assert f"cannot resume from {checkpoint}: the config changed" in text
    assert "learning_rate: 0.01 → 0.05" in text
    assert "seed: 3 → 7" in text
    assert "micro_batch_size: 2 → 4" in text
    assert "datasets[0].path:" in text and "other.jsonl" in text
    assert "prepared data (fingerprint)" in text
    assert "resume_allow_changes = true" in text  # the fix
    assert refused.value.exit_code == 4


def test_with_resume_allow_changes_a_new_learning_rate_is_applied(tiny_project, checkpoint, capsys):
    # The schedule (cosine, 1 warmup step, 4 steps) as a run with the new peak rate follows it.
    api.train(
        tiny_project(*FIRST, "learning_rate=0.05", f"output_dir='{tiny_project.tmp_path}/ref'")
    )
    reference = _learning_rates(tiny_project.tmp_path / "ref")
    capsys.readouterr()
    api.train(
        _resume(
            tiny_project,
            checkpoint,
            "learning_rate=0.05",
            "weight_decay=0.1",
            "resume_allow_changes=true",
        )
    )
    shown = _flat(capsys.readouterr().out)
    resumed = _learning_rates(tiny_project.tmp_path / "resumed")
    assert resumed[3] == pytest.approx(reference[3]) and resumed[4] == pytest.approx(reference[4])
    assert resumed[3] == pytest.approx(0.0375)  # 0.05 × cosine(step 2 of 3 after warmup)
    assert "applied on resume: learning_rate 0.01 → 0.05" in shown
    assert "weight_decay 0.0 → 0.1" in shown


def test_a_lora_rank_change_is_a_clear_error_naming_the_key_even_with_the_opt_in(
    tiny_project, checkpoint
):
    config = _resume(tiny_project, checkpoint, "lora_r=8", "resume_allow_changes=true")
    with pytest.raises(SftError) as refused:
        api.train(config)
    text = str(refused.value)
    assert "lora_r: 4 → 8" in text and "adapter weights have another shape" in text
    assert "put back lora_r = 4" in text


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(tiny_project, checkpoint):
    # A checkpoint written before checkpoints recorded their config: the shape mismatch is
    # found when the Trainer loads it, and reported without the library's traceback.
    (checkpoint / "sft_config.yaml").unlink(missing_ok=True)
    with pytest.raises(SftError) as refused:
        api.train(_resume(tiny_project, checkpoint, "lora_r=8"))
    text = str(refused.value)
    assert f"cannot resume from {checkpoint}: its weights or optimizer state do not fit" in text
    assert "size mismatch" in text and len(text.splitlines()) < 8


def test_an_older_checkpoint_without_its_config_still_refuses_a_new_learning_rate(
    tiny_project, checkpoint
):
    (checkpoint / "sft_config.yaml").unlink(missing_ok=True)
    with pytest.raises(SftError) as refused:
        api.train(_resume(tiny_project, checkpoint, "learning_rate=0.05"))
    assert "its optimizer state differs from this config: learning_rate 0.01 → 0.05" in str(
        refused.value
    )


def test_resume_from_the_output_dir_continues_from_its_newest_checkpoint(
    tiny_project, checkpoint, capsys
):
    out = checkpoint.parent
    shutil.rmtree(out / "checkpoint-4")
    result = api.train(_resume(tiny_project, out))
    assert result.resumed_from == str(out / "checkpoint-2")
    assert result.global_step == 4
    shown = _flat(capsys.readouterr().out)
    assert "holds checkpoints; resuming from the newest, checkpoint-2" in shown


def test_harmless_changes_and_moved_data_resume_with_a_note(tiny_project, checkpoint, capsys):
    moved = tiny_project.tmp_path / "moved.jsonl"
    shutil.copy(tiny_project.tmp_path / "data.jsonl", moved)
    result = api.train(
        _resume(tiny_project, checkpoint, "logging_steps=2", f"datasets[0].path='{moved}'")
    )
    assert result.global_step == 4
    shown = _flat(capsys.readouterr().out)
    note = shown[shown.index("note: changed since checkpoint-2") :]
    assert "logging_steps: 1 → 2" in note and "datasets[0].path" in note


def test_the_data_fingerprint_ignores_how_the_prepared_data_is_stored(tmp_path):
    # A run that reads the prepared data back from the cache (in several shards) must match the
    # checkpoint written by the run that prepared it; any other content must not.
    import datasets

    from sft.train.resume import data_fingerprint

    rows = [list(range(i % 300 + 1)) for i in range(3000)]
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
        }
    )
    fresh = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}, features=features)
    fresh.save_to_disk(str(tmp_path / "cache"), max_shard_size="100KB")
    cached = datasets.load_from_disk(str(tmp_path / "cache"))
    assert cached.data.table.column("input_ids").num_chunks > 1
    assert data_fingerprint(fresh, None) == data_fingerprint(cached, None)
    assert data_fingerprint(fresh, None) != data_fingerprint(fresh.select(range(2999)), None)
    assert data_fingerprint(fresh, None) != data_fingerprint(fresh, fresh)
