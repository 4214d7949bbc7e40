"""`sft_save_checkpoint` / `sft_resume_checkpoint`: a plugin's own state in checkpoints, written
into the staged checkpoint (so it is there when the checkpoint appears) and handed back on resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sft import hookimpl


class StepCounter:
    """Writes the step it saw into each checkpoint; reads it back when a run resumes."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, bool]] = []
        self.resumed: list[tuple[str, str, int]] = []

    @hookimpl
    def sft_save_checkpoint(self, config: Any, trainer: Any, checkpoint_dir: str) -> None:
        directory = Path(checkpoint_dir)
        (directory / "counter.txt").write_text(str(trainer.state.global_step))
        # staged: the trainer's own files are there, the directory is not yet in place
        self.saved.append((directory.name, (directory / "trainer_state.json").is_file()))
        assert directory.parent.name == ".staging"

    @hookimpl
    def sft_resume_checkpoint(self, config: Any, trainer: Any, checkpoint_dir: str) -> None:
        text = (Path(checkpoint_dir) / "counter.txt").read_text()
        self.resumed.append((Path(checkpoint_dir).name, text, trainer.state.global_step))


def _run(tiny_project, counter: StepCounter, *overrides: str) -> Any:
    from sft.manager import SftPlugins, set_plugins
    from sft.train.run import train

    plugins = SftPlugins.load(environ={})
    plugins.register(counter, name="counter")
    set_plugins(plugins)
    try:
        return train(tiny_project(*overrides), plugins=plugins)
    finally:
        set_plugins(None)


def test_sft_save_checkpoint(tiny_project):
    counter = StepCounter()
    result = _run(tiny_project, counter, "max_steps=3", "save_steps=2")
    assert counter.saved[0] == ("checkpoint-2", True)
    assert (result.output_dir / "checkpoint-2" / "counter.txt").read_text() == "2"
    assert not (result.output_dir / ".staging").exists()


def test_sft_resume_checkpoint(tiny_project):
    counter = StepCounter()
    first = _run(tiny_project, counter, "max_steps=3", "save_steps=2")
    tmp = tiny_project.tmp_path
    (tmp / "again").mkdir()
    shutil.copytree(first.output_dir / "checkpoint-2", tmp / "again" / "checkpoint-2")
    resumed = StepCounter()
    _run(
        tiny_project,
        resumed,
        "max_steps=3",
        "save_steps=2",
        f"output_dir={tmp}/again",
        "auto_resume_from_checkpoints=true",
    )
    # before the trainer loaded the checkpoint's state and took a step
    assert resumed.resumed == [("checkpoint-2", "2", 0)]
