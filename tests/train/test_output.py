"""A run's output_dir: sft never deletes or overwrites files it did not write, and says so
before preparing any data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from sft.errors import ConfigError, ModelError

NOTES = "MY PROJECT NOTES - irreplaceable"


def marker_files(directory: Path) -> list[str]:
    return json.loads((directory / ".sft-output").read_text())["files"]


def test_a_fresh_run_into_a_folder_of_user_files_is_refused_before_any_data_is_prepared(
    tiny_project, tmp_path, capsys
):
    from sft.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(NOTES)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    config = tmp_path / "config.toml"
    config.write_text(
        f'max_steps = 1\nadapter = "lora"\ndataset_prepared_path = "{tmp_path / "prep"}"\n'
        + TINY_CONFIG.replace("{tmp}", str(tmp_path))
    )
    assert main(["run", str(config)]) == 4
    err = capsys.readouterr().err
    assert "output_dir" in err and "files sft did not write" in err
    assert "README.md" in err and "overwrite_output_dir" in err and "Traceback" not in err
    assert (out / "README.md").read_text() == NOTES
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert not (tmp_path / "prep").exists()  # refused before any data was prepared

    # Opting in writes sft's files there and keeps the user's others.
    (out / "notes.txt").write_text(NOTES)
    assert main(["run", str(config), "--set", "overwrite_output_dir=true"]) == 0
    assert (out / "notes.txt").read_text() == NOTES
    assert (out / "adapter_model.safetensors").exists()
    recorded = marker_files(out)
    assert {"adapter_model.safetensors", "README.md", "sft_config.yaml", "metrics.jsonl"} <= set(
        recorded
    )
    assert "notes.txt" not in recorded
    assert '"loss": 1.0}' not in (out / "metrics.jsonl").read_text()  # a fresh log


def claim(config, resuming=False):
    from sft.train.output import claim_output_dir

    return claim_output_dir(config, resuming=resuming)


def finished_run(out: Path, files: dict[str, str]) -> None:
    """An output_dir as a finished sft run leaves it (without checkpoints)."""
    from sft.fsutil import mark_directory

    out.mkdir(parents=True)
    for name, text in files.items():
        (out / name).write_text(text)
    mark_directory(out, files)


def test_a_new_or_empty_output_dir_is_created_and_marked(make_config, tmp_path):
    claimed = claim(make_config('output_dir = "{tmp}/new/out"\n[[datasets]]\npath = "org/x"\n'))
    assert claimed.path == tmp_path / "new" / "out"
    assert marker_files(claimed.path) == []


def test_a_finished_sft_result_is_refused_without_the_opt_in(make_config, tmp_path):
    finished_run(tmp_path / "out", {"sft_config.yaml": "x", "adapter_config.json": "{}"})
    config = make_config('output_dir = "{tmp}/out"\n[[datasets]]\npath = "org/x"\n')
    with pytest.raises(ConfigError, match="the result of an earlier sft run"):
        claim(config)


def test_an_sft_run_that_kept_nothing_is_started_again_with_a_fresh_log(make_config, tmp_path):
    out = tmp_path / "out"
    finished_run(out, {})
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # stopped before its first checkpoint
    claim(make_config('output_dir = "{tmp}/out"\n[[datasets]]\npath = "org/x"\n'))
    assert not (out / "metrics.jsonl").exists()


def test_the_opt_in_replaces_the_earlier_result_and_keeps_everything_else(make_config, tmp_path):
    out = tmp_path / "out"
    finished_run(
        out,
        {
            "adapter_config.json": "{}",
            "adapter_model.safetensors": "old",
            "README.md": "old card",
            "sft_config.yaml": "old",
            "metrics.jsonl": "old\n",
        },
    )
    (out / "eval_results.txt").write_text(NOTES)  # added by the user after that run
    config = make_config(
        'output_dir = "{tmp}/out"\noverwrite_output_dir = true\n[[datasets]]\npath = "org/x"\n'
    )
    claimed = claim(config)
    assert not (out / "metrics.jsonl").exists()
    assert (out / "adapter_config.json").exists()  # kept until the new result is saved
    for name in ("model.safetensors", "config.json", "README.md", "sft_config.yaml"):
        (out / name).write_text("new")  # a full fine-tune this time
    claimed.record_result()
    assert sorted(p.name for p in out.iterdir()) == [
        ".sft-output",
        "README.md",
        "config.json",
        "eval_results.txt",
        "model.safetensors",
        "sft_config.yaml",
    ]  # no stale adapter that `sft chat` would load instead of the new model
    assert (out / "eval_results.txt").read_text() == NOTES


def test_old_checkpoints_are_refused_before_anything_slow_and_kept_with_the_opt_in(
    make_config, tmp_path
):
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    for extra in ("", "overwrite_output_dir = true\n"):
        config = make_config(extra + 'output_dir = "{tmp}/out"\n[[datasets]]\npath = "org/x"\n')
        with pytest.raises(ModelError, match="auto_resume_from_checkpoints"):
            claim(config)
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    resumed = make_config(
        'output_dir = "{tmp}/out"\nauto_resume_from_checkpoints = true\n[[datasets]]\npath = "org/x"\n'
    )
    claim(resumed, resuming=True)  # continuing the run that wrote them
