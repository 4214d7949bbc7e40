"""The trainer's checkpoints when the disk fills up: a clear error, nothing half-written left."""

from __future__ import annotations

import errno

from conftest import TINY_CONFIG


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_removes_the_partial_one(
    tiny_project, tmp_path, monkeypatch, capsys
):
    import transformers

    from sft.cli import main
    from sft.train.output import latest_checkpoint

    original = transformers.Trainer._save_rng_state

    def full_disk_at_step_2(self, output_dir):
        if self.state.global_step == 2:  # model and optimizer are written by now
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", full_disk_at_step_2)
    config = tmp_path / "config.toml"
    config.write_text(
        'max_steps = 2\nsave_steps = 1\nadapter = "lora"\n'
        + TINY_CONFIG.replace("{tmp}", str(tmp_path))
    )
    assert main(["run", str(config)]) == 6
    err = capsys.readouterr().err
    out = tmp_path / "out"
    assert f"cannot write checkpoint {out / 'checkpoint-2'}: No space left on device" in err
    assert "Traceback" not in err
    assert latest_checkpoint(out) == out / "checkpoint-1"  # complete: a resume starts there
    assert not (out / ".staging").exists()  # the partial checkpoint does not keep the disk full


def test_a_full_disk_during_the_final_save_is_a_clear_error(
    tiny_project, tmp_path, monkeypatch, capsys
):
    import transformers

    from sft.cli import main

    original = transformers.PreTrainedModel.save_pretrained

    def full_disk_at_the_end(self, save_directory, *args, **kwargs):
        if "checkpoint-" not in str(save_directory):  # checkpoints fit; the final save does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk_at_the_end)
    config = tmp_path / "config.toml"
    config.write_text("max_steps = 1\n" + TINY_CONFIG.replace("{tmp}", str(tmp_path)))
    assert main(["run", str(config)]) == 6
    err = capsys.readouterr().err
    assert f"cannot write the trained model to {tmp_path / 'out'}: No space left on device" in err
    assert "checkpoint-1 is complete" in err and "Traceback" not in err
