"""Experiment tracking: Axolotl's keys → the Trainer's `report_to` / `run_name` and the
trackers' environment, set for one run only; a real offline W&B run; missing packages found
by `sft validate`."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sft.errors import ConfigError
from sft.train.tracking import environment, report_to, run_name, tracking

DATA = '[[datasets]]\npath = "org/data"\ntype = "alpaca"\n'
TRACKER_VARIABLES = (
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_MODE",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_WATCH",
    "WANDB_LOG_MODEL",
    "WANDB_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "HF_MLFLOW_LOG_ARTIFACTS",
    "COMET_API_KEY",
    "COMET_WORKSPACE",
    "COMET_PROJECT_NAME",
    "COMET_EXPERIMENT_KEY",
    "COMET_START_MODE",
    "COMET_START_ONLINE",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in TRACKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def loose(make_config):
    """Configs for trackers whose packages are not installed here (no machine checks)."""
    from sft.config import load_config_text

    def make(text: str):
        head = f'base_model = "m"\noutput_dir = "{make_config.tmp_path}/out"\n'
        return load_config_text(head + text + DATA, machine_checks=False)

    return make


def test_no_tracker_keys_report_to_nothing_and_set_nothing(loose):
    config = loose("")
    assert report_to(config) == [] and run_name(config) is None and environment(config) == {}


def test_wandb_keys_map_to_wandb_and_its_variables(loose):
    config = loose(
        'wandb_project = "p"\nwandb_entity = "team"\nwandb_name = "run-1"\n'
        'wandb_run_id = "abc123"\nwandb_mode = "offline"\nwandb_watch = "gradients"\n'
        'wandb_log_model = "end"\n'
    )
    assert report_to(config) == ["wandb"] and run_name(config) == "run-1"
    assert environment(config) == {
        "WANDB_PROJECT": "p",
        "WANDB_ENTITY": "team",
        "WANDB_MODE": "offline",
        "WANDB_RUN_ID": "abc123",
        "WANDB_RESUME": "allow",
        "WANDB_WATCH": "gradients",
        "WANDB_LOG_MODEL": "end",
        "WANDB_DIR": str(Path(config.output_dir).resolve()),
    }


def test_wandb_mode_disabled_turns_wandb_off(loose):
    config = loose('wandb_project = "p"\nwandb_mode = "disabled"\nwandb_entity = "t"\n')
    assert report_to(config) == [] and environment(config) == {}


def test_mlflow_and_comet_keys_map_to_their_variables(loose):
    config = loose(
        'mlflow_tracking_uri = "file:./mlruns"\nmlflow_experiment_name = "exp"\n'
        'mlflow_run_name = "r"\nhf_mlflow_log_artifacts = true\n'
        'comet_project_name = "cp"\ncomet_workspace = "ws"\ncomet_api_key = "KEY"\n'
        'comet_experiment_key = "k"\ncomet_mode = "get"\ncomet_online = false\n'
        "use_tensorboard = true\n"
    )
    assert run_name(config) == "r"
    assert environment(config) == {
        "MLFLOW_TRACKING_URI": "file:./mlruns",
        "MLFLOW_EXPERIMENT_NAME": "exp",
        "HF_MLFLOW_LOG_ARTIFACTS": "TRUE",
        "COMET_API_KEY": "KEY",
        "COMET_WORKSPACE": "ws",
        "COMET_PROJECT_NAME": "cp",
        "COMET_EXPERIMENT_KEY": "k",
        "COMET_START_MODE": "get",
        "COMET_START_ONLINE": "false",
    }


def test_tracking_sets_variables_for_the_run_only_and_restores_the_previous_ones(
    loose, monkeypatch
):
    monkeypatch.setenv("WANDB_ENTITY", "from-the-shell")
    config = loose('wandb_project = "p"\nwandb_entity = "team"\nmlflow_experiment_name = "e"\n')
    with tracking(config):
        assert os.environ["WANDB_PROJECT"] == "p" and os.environ["WANDB_ENTITY"] == "team"
        assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "e"
    assert os.environ["WANDB_ENTITY"] == "from-the-shell"
    assert "WANDB_PROJECT" not in os.environ and "MLFLOW_EXPERIMENT_NAME" not in os.environ
    with pytest.raises(RuntimeError), tracking(config):
        raise RuntimeError("the run failed")
    assert "WANDB_PROJECT" not in os.environ and os.environ["WANDB_ENTITY"] == "from-the-shell"


def test_keys_of_a_tracker_that_is_off_are_errors(make_config):
    with pytest.raises(ConfigError) as caught:
        make_config(f'wandb_entity = "team"\nmlflow_run_name = "r"\ncomet_online = false\n{DATA}')
    problems = {p.path: p for p in caught.value.problems}
    assert problems["wandb_entity"].message == "has no effect: W&B logging is off"
    assert "set wandb_project" in problems["wandb_entity"].hint
    assert problems["mlflow_run_name"].message == "has no effect: MLflow logging is off"
    assert problems["comet_online"].message == "has no effect: Comet logging is off"


def test_two_different_run_names_are_an_error(loose):
    with pytest.raises(ConfigError, match="conflicts with wandb_name = 'a'"):
        loose(
            'wandb_project = "p"\nwandb_name = "a"\nmlflow_experiment_name = "e"\nmlflow_run_name = "b"\n'
        )


def test_a_missing_tracker_package_is_a_machine_problem_naming_the_extra(tmp_path, plugins, capsys):
    from sft.cli import main
    from sft.hardware import installed

    assert not installed("mlflow") and not installed("comet_ml")  # as on CI
    config = tmp_path / "c.toml"
    config.write_text(
        f'base_model = "m"\nmlflow_experiment_name = "e"\ncomet_project_name = "p"\n{DATA}'
    )
    assert main(["validate", str(config)]) == 4
    err = capsys.readouterr().err
    assert (
        "mlflow_experiment_name (line 2): MLflow logging needs the mlflow package, which is not installed here [this machine]"
        in err
    )
    assert "fix: pip install 'sft-train[mlflow]'" in err
    assert "comet_project_name (line 3): Comet logging needs the comet_ml package" in err
    assert "pip install 'sft-train[comet]'" in err
    assert main(["validate", "--portable", str(config)]) == 0


# -- a real offline W&B run --------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` run file: a 7-byte header, then LevelDB-log records in 32 KiB
    blocks (checksum, length, type; FULL / FIRST / MIDDLE / LAST), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        if kind == 0 and length == 0:
            break
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_an_offline_wandb_run_writes_its_run_files_and_leaves_no_trace(tiny_project):
    pytest.importorskip("wandb")
    import wandb

    from sft.train.run import train

    config = tiny_project(
        "max_steps=3",
        "adapter=lora",
        "lora_r=4",
        "wandb_project=sft-tests",
        "wandb_name=tiny-run",
        "wandb_mode=offline",
    )
    result = train(config)
    runs = sorted((result.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, sorted(result.output_dir.iterdir())
    records = wandb_records(runs[0])
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "sft-tests" and run.display_name == "tiny-run"
    logged = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    losses = [row for row in logged if "train/loss" in row]
    assert [row["train/global_step"] for row in losses] == ["1", "2", "3"]
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished
    assert wandb.run is None
    for name in ("WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR"):
        assert name not in os.environ

    # The next run in this process, without W&B keys, reports to nothing and writes no run.
    again = train(tiny_project("max_steps=1", "output_dir=" + str(result.output_dir) + "2"))
    assert not (again.output_dir / "wandb").exists() and wandb.run is None


def test_the_comet_api_key_is_not_written_to_sft_config_yaml(loose, tmp_path):
    from sft.save import write_resolved_config

    config = loose('comet_project_name = "p"\ncomet_api_key = "SECRET-KEY"\n')
    text = write_resolved_config(config, tmp_path).read_text()
    assert "SECRET-KEY" not in text and "comet_api_key: null" in text
