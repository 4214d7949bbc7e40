"""Checkpoints are atomic; a run killed with SIGKILL resumes with the same command and ends where
an uninterrupted run ends (same step, same final loss)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, make_distribution

from sft.train.output import latest_checkpoint

# A plugin (installed as its own distribution) whose trainer callback parks the run right
# after a chosen checkpoint is saved, so the test can kill it there.
PAUSE_PLUGIN = """
import os, time
from pathlib import Path
from sft import hookimpl


@hookimpl
def sft_trainer_callbacks(config):
    from transformers import TrainerCallback

    class PauseAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ.get("PAUSE_AT_STEP", "-1")):
                Path(os.environ["PAUSE_FLAG"]).write_text(str(state.global_step))
                time.sleep(120)

    return [PauseAfterSave()]
"""


def final_loss(out: Path) -> tuple[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    return last["step"], last["loss"]


def test_checkpoint_directories_appear_only_complete(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / ".staging" / "checkpoint-8").mkdir(parents=True)  # a save killed midway
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_the_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for step in (3, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_a_save_that_fails_midway_leaves_no_checkpoint_to_resume_from(
    tiny_project, tmp_path, monkeypatch
):
    import transformers

    from sft.train.run import train

    original = transformers.Trainer._save_rng_state

    def fail_at_step_2(self, output_dir):
        if self.state.global_step == 2:  # the model and the optimizer are written by now
            raise RuntimeError("injected failure mid-save")
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", fail_at_step_2)
    with pytest.raises(RuntimeError, match="injected failure mid-save"):
        train(tiny_project("max_steps=2", "save_steps=1", "adapter=lora"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert latest_checkpoint(out) == out / "checkpoint-1"
    assert (out / "checkpoint-1" / "rng_state.pth").is_file()  # the complete one is kept


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(
    tiny_project, tmp_path
):
    site = make_distribution(
        tmp_path / "site",
        "sft-pause-plugin",
        {"pause": "sft_pause_plugin"},
        {"sft_pause_plugin": PAUSE_PLUGIN},
    )
    config = tmp_path / "config.toml"
    config.write_text(
        TINY_CONFIG.replace("{tmp}", str(tmp_path)).replace(
            "num_epochs = 1",
            "num_epochs = 2\nsave_steps = 3\nauto_resume_from_checkpoints = true\nadapter = 'lora'\nlora_dropout = 0.1",
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "PAUSE_FLAG": str(tmp_path / "paused"),
    }
    command = [sys.executable, "-m", "sft", "run", str(config)]

    reference = subprocess.run(
        [*command, "--set", f"output_dir={tmp_path / 'reference'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    victim = subprocess.Popen(
        command,
        env={**env, "PAUSE_AT_STEP": "6"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not (tmp_path / "paused").exists():
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never reached its checkpoint"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    out = tmp_path / "out"
    assert latest_checkpoint(out) == out / "checkpoint-6"
    assert not (out / "adapter_model.safetensors").exists()  # it never finished

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    step, loss = final_loss(out)
    ref_step, ref_loss = final_loss(tmp_path / "reference")
    assert step == ref_step == 24
    # Same data order, RNG (dropout) and optimizer state: equal up to float summation order.
    assert loss == pytest.approx(ref_loss, abs=1e-5)
