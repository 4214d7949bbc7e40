"""Ctrl-C (SIGINT) and SIGTERM: the run finishes its step, writes a checkpoint, stops with a
message saying how to resume, and the same command (or the one it names) resumes from there.
A second Ctrl-C stops at once; a signal before training starts stops cleanly."""

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

from sft import api, hookimpl
from sft.train.output import latest_checkpoint

# A plugin (its own distribution) that parks the run where the test wants to send a signal:
# in the tokenizer hook (before training), or at the end of optimizer step PARK_AT_STEP until
# the test writes PARK_FLAG.go (so the signal deterministically lands during that step).
PARK_PLUGIN = """
import os, time
from pathlib import Path
from sft import hookimpl


def _park(what):
    flag = Path(os.environ["PARK_FLAG"])
    flag.write_text(what)
    go = Path(str(flag) + ".go")
    deadline = time.time() + 120
    while not go.exists() and time.time() < deadline:
        time.sleep(0.05)


@hookimpl
def sft_prepare_tokenizer(tokenizer, config):
    if os.environ.get("PARK_BEFORE_TRAINING"):
        _park("before training")


@hookimpl
def sft_trainer_callbacks(config):
    from transformers import TrainerCallback

    class ParkAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ.get("PARK_AT_STEP", "-1")):
                _park(str(state.global_step))

    return [ParkAtStep()]
"""


def _project(tmp_path: Path, extra: str) -> tuple[list[str], dict[str, str]]:
    site = make_distribution(
        tmp_path / "site",
        "sft-park-plugin",
        {"park": "sft_park_plugin"},
        {"sft_park_plugin": PARK_PLUGIN},
    )
    config = tmp_path / "config.toml"
    config.write_text(
        TINY_CONFIG.replace("{tmp}", str(tmp_path)).replace(
            "num_epochs = 1", f"num_epochs = 2\nsave_steps = 5\nadapter = 'lora'\n{extra}"
        )
    )
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "PARK_FLAG": str(tmp_path / "parked"),
    }
    env.pop("SFT_DEBUG", None)
    return [sys.executable, "-m", "sft", "run", str(config)], env


def _start_and_park(command: list[str], env: dict[str, str], flag: Path) -> subprocess.Popen:
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not flag.exists():
        if run.poll() is not None:
            pytest.fail(f"the run ended before it parked: {run.communicate()[1][-3000:]}")
        assert time.time() < deadline, "the run never parked"
        time.sleep(0.1)
    return run


def _last_step(out: Path) -> int:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in records if "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "exit_code", "auto_resume"),
    [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_mid_training_saves_a_checkpoint_then_the_run_resumes_from_it(
    tiny_project, tmp_path, signum, exit_code, auto_resume
):
    command, env = _project(tmp_path, "auto_resume_from_checkpoints = true" if auto_resume else "")
    flag = tmp_path / "parked"
    run = _start_and_park(command, {**env, "PARK_AT_STEP": "7"}, flag)
    run.send_signal(signum)
    Path(str(flag) + ".go").write_text("")  # let step 7 finish
    _, stderr = run.communicate(timeout=120)

    assert run.returncode == exit_code, stderr[-3000:]
    out = tmp_path / "out"
    assert "Traceback" not in stderr
    assert f"stopped at step 7/24; checkpoint written to {out / 'checkpoint-7'}" in stderr
    if auto_resume:
        assert "to resume: run the same command again" in stderr
    else:
        assert f"--set resume_from_checkpoint={out / 'checkpoint-7'}" in stderr
        assert "--set auto_resume_from_checkpoints=true" in stderr
    assert latest_checkpoint(out) == out / "checkpoint-7"  # saved at the step it was at
    assert (out / "checkpoint-5").is_dir()
    assert not (out / "adapter_model.safetensors").exists()  # no final save: it stopped

    again = command if auto_resume else [*command, "--set", "auto_resume_from_checkpoints=true"]
    resumed = subprocess.run(again, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-7'}" in resumed.stdout
    assert _last_step(out) == 24
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_project, tmp_path):
    command, env = _project(tmp_path, "")
    flag = tmp_path / "parked"
    run = _start_and_park(command, {**env, "PARK_AT_STEP": "3"}, flag)  # parked up to 120 s
    run.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert run.poll() is None  # the first Ctrl-C only asks for a checkpoint after the step
    started = time.time()
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert time.time() - started < 20
    assert run.returncode == 130, stderr[-3000:]
    assert "Ctrl-C (SIGINT) again: stopped at once, without saving a checkpoint" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "checkpoint-3").exists()


@pytest.mark.slow
def test_sigterm_before_training_stops_cleanly(tiny_project, tmp_path):
    command, env = _project(tmp_path, "")
    flag = tmp_path / "parked"
    run = _start_and_park(command, {**env, "PARK_BEFORE_TRAINING": "1"}, flag)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143, stderr[-3000:]
    assert "SIGTERM: stopped before training (nothing to save)" in stderr
    assert "Traceback" not in stderr


class _SignalAtStep:
    """An in-process plugin whose callback sends this process a signal during a step."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    @hookimpl
    def sft_trainer_callbacks(self, config):
        from transformers import TrainerCallback

        outer = self

        class Send(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == outer.step:
                    os.kill(os.getpid(), outer.signum)

        return [Send()]


def test_api_train_raises_interrupted_with_the_checkpoint_and_restores_signal_handlers(
    tiny_project, plugins
):
    from sft.errors import Interrupted

    plugins.register(_SignalAtStep(signal.SIGTERM, 3), "signal-at-step")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    config = tiny_project("adapter=lora", "max_steps=6", "save_steps=4")
    with pytest.raises(Interrupted) as stopped:
        api.train(config)
    out = tiny_project.tmp_path / "out"
    assert stopped.value.exit_code == 143
    assert stopped.value.checkpoint == str(out / "checkpoint-3")
    assert latest_checkpoint(out) == out / "checkpoint-3"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize(
    ("phase", "says"),
    [
        ({}, "SIGTERM: stopped before training (nothing to save)"),
        ({"trained": True}, "SIGTERM: stopped after training, before the final save finished"),
        ({"training": True, "signum": signal.SIGTERM}, "SIGTERM again: stopped at once"),
    ],
)
def test_a_signal_outside_a_step_says_which_phase_it_stopped(phase, says):
    from sft.errors import Interrupted
    from sft.train.interrupt import StopRequest

    stop = StopRequest(**phase)
    with pytest.raises(Interrupted) as stopped:
        stop._handle(signal.SIGTERM, None)
    assert stopped.value.message.startswith(says)
    assert stopped.value.exit_code == 143
