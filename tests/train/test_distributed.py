"""Two real processes on CPU (gloo), started by `sft run --nproc-per-node 2`.

The same global batch gives the same saved weights as one process; the data is prepared once;
progress is printed once; a run killed with SIGKILL resumes with the same command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, make_distribution

from sft.data.pipeline import ALIASES

pytestmark = pytest.mark.distributed

# SGD with a constant rate and no clipping: the update is exactly lr × gradient, so any
# difference in what the processes see or how their gradients are averaged shows.
EXACT = """
optimizer = "sgd"
lr_scheduler = "constant"
max_grad_norm = 0
shuffle_merged_datasets = false
"""


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    body = TINY_CONFIG.replace("{tmp}", str(tmp_path)).replace("num_epochs = 1", EXACT + extra)
    config.write_text(body)
    return config


def sft(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "sft", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def assert_same_weights(first: Path, second: Path, base: Path) -> None:
    import torch

    a, b, start = weights(first), weights(second), weights(base)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # training moved them
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_project, tmp_path):
    config = write_config(tmp_path, "max_steps = 3\n")
    one = sft("run", str(config), "--set", f"output_dir={tmp_path / 'one'}",
              "--set", "gradient_accumulation_steps=2")  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = sft(
        "run", str(config), "--nproc-per-node", "2", "--set", f"output_dir={tmp_path / 'two'}"
    )
    assert two.returncode == 0, two.stderr
    assert_same_weights(tmp_path / "one", tmp_path / "two", tmp_path / "tiny")
    # One process prints, and it counts both processes' steps and tokens.
    assert two.stdout.count("step 1/3 |") == 1 and two.stdout.count("saved model") == 1
    assert "steps: 3 (6 per epoch, 2 processes)" in two.stdout
    # The data was prepared once, by local rank 0, into one cache entry the other loaded.
    entries = [p.name for p in (tmp_path / "two" / ".sft-prepared").iterdir() if p.name != ALIASES]
    assert len(entries) == 1 and not entries[0].startswith("."), entries
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # an ordinary model


@pytest.mark.slow
def test_a_two_process_lora_run_saves_an_adapter_peft_loads(tiny_project, tmp_path):
    config = write_config(tmp_path, "max_steps = 2\nadapter = 'lora'\nlora_target_linear = true\n")
    run = sft(
        "run", str(config), "--nproc-per-node", "2", "--set", f"output_dir={tmp_path / 'out'}"
    )
    assert run.returncode == 0, run.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    PeftModel.from_pretrained(base, tmp_path / "out")


# Parks the run right after the checkpoint of a chosen step, so the test can kill it there.
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
                rank = os.environ["RANK"]
                Path(os.environ["PAUSE_FLAG"] + "." + rank).write_text(str(os.getpid()))
                time.sleep(120)

    return [PauseAfterSave()]
"""


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_the_same_command(tiny_project, tmp_path):
    site = make_distribution(
        tmp_path / "site",
        "sft-pause-plugin",
        {"pause": "sft_pause_plugin"},
        {"sft_pause_plugin": PAUSE_PLUGIN},
    )
    config = write_config(
        tmp_path, "max_steps = 4\nsave_steps = 2\nauto_resume_from_checkpoints = true\n"
    )
    env = {
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "PAUSE_FLAG": str(tmp_path / "paused"),
    }
    command = ["run", str(config), "--nproc-per-node", "2"]
    reference = sft(*command, "--set", f"output_dir={tmp_path / 'reference'}", env=env)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "sft", *command, "--set", f"output_dir={out}"],
        env={**os.environ, **env, "PAUSE_AT_STEP": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and both workers in one process group
    )
    deadline = time.time() + 240
    flags = [tmp_path / "paused.0", tmp_path / "paused.1"]
    while not all(flag.exists() for flag in flags):
        assert process.poll() is None and time.time() < deadline, "the run never reached step 2"
        time.sleep(0.5)
    # Like a node that dies: the launcher and both workers (in sessions of their own) at once.
    os.killpg(process.pid, signal.SIGKILL)
    for flag in flags:
        os.kill(int(flag.read_text()), signal.SIGKILL)
    process.wait()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()

    resumed = sft(*command, "--set", f"output_dir={out}", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert_same_weights(tmp_path / "reference", out, tmp_path / "tiny")


def test_the_launcher_hands_each_process_the_same_arguments():
    from sft.launch import child_argv

    argv = [
        "run",
        "c.toml",
        "--nproc-per-node",
        "2",
        "--set",
        "seed=3",
        "--nnodes=1",
        "--traceback",
    ]
    assert child_argv(argv) == ["run", "c.toml", "--set", "seed=3", "--traceback"]


def test_too_little_data_for_the_processes_is_said_before_training(monkeypatch, tiny_project):
    from sft.errors import DataError
    from sft.train.run import check_data_fills_a_step

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DataError, match="3 training samples for 4 processes"):
        check_data_fills_a_step(3, tiny_project())


# Slows each step down from step 2 on, so that a signal lands in the middle of the run.
SLOW_PLUGIN = """
import os, time
from pathlib import Path
from sft import hookimpl


@hookimpl
def sft_trainer_callbacks(config):
    from transformers import TrainerCallback

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                Path(os.environ["SLOW_FLAG"] + "." + os.environ["RANK"]).write_text("")
                time.sleep(1.0)

    return [Slow()]
"""


@pytest.mark.slow
def test_sigterm_stops_both_processes_at_one_step_with_a_checkpoint(tiny_project, tmp_path):
    site = make_distribution(
        tmp_path / "site", "sft-slow-plugin", {"slow": "sft_slow_plugin"},
        {"sft_slow_plugin": SLOW_PLUGIN},
    )  # fmt: skip
    config = write_config(tmp_path, "max_steps = 40\nauto_resume_from_checkpoints = true\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "SLOW_FLAG": str(tmp_path / "slow"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "sft", "run", str(config), "--nproc-per-node", "2",
         "--set", f"output_dir={out}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not all((tmp_path / f"slow.{rank}").exists() for rank in (0, 1)):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints  # both processes stopped at the same step
    step = int(checkpoints[0].split("-")[1])
    assert 2 <= step < 40
    assert f"SIGTERM: stopped at step {step}/40; checkpoint written to" in stderr
    assert stderr.count("stopped at step") == 1  # said once, by rank 0


def test_plugins_list_shows_each_engine_and_whether_it_can_run_here(plugins, monkeypatch):
    import sft.plugins.deepspeed as deepspeed
    from sft.cli import plugin_rows

    rows = {row["name"]: row for row in plugin_rows(plugins)}
    assert rows["fsdp"]["provides"]["distributed_backends"] == ["fsdp", "fsdp2_native"]
    assert rows["deepspeed"]["provides"]["distributed_backends"] == ["deepspeed"]
    assert rows["fsdp"]["status"] == "ok"
    monkeypatch.setattr(deepspeed, "installed", lambda module: False)  # as without the package
    row = {row["name"]: row for row in plugin_rows(plugins)}["deepspeed"]
    assert row["status"] == "unavailable"
    assert row["error"] == "deepspeed: pip install 'sft-train[deepspeed]'"


def test_fsdp_and_deepspeed_together_are_refused_before_any_process_starts(make_config):
    from sft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        make_config(
            'deepspeed = "zero2"\nfsdp_version = 2\n[[datasets]]\npath = "org/data"\n',
        )
    messages = [p.message for p in error.value.problems]
    assert any("are both selected: a run uses one distributed engine" in m for m in messages)
