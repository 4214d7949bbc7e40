"""`sft merge-lora --output DIR`: it never deletes a directory or a file sft did not write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.cli import main

NOTES = "irreplaceable"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A saved LoRA adapter (untrained) beside its tiny base model, as `sft run` leaves it."""
    from peft import LoraConfig, get_peft_model

    from sft.testing import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("trained")
    tokenizer = build_tokenizer(eos_token="</s>")
    model = build_model(tokenizer)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "out")
    tokenizer.save_pretrained(root / "out")
    (root / "out" / "sft_config.yaml").write_text(f"base_model: {root / 'base'}\n")
    return root / "out"


def user_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "thesis.txt").write_text(NOTES)
    (root / "sub" / "data.bin").write_text(NOTES)
    return root


def test_a_non_empty_output_is_refused_and_kept_whole(adapter_dir, tmp_path, capsys):
    precious = user_tree(tmp_path / "precious")
    assert main(["merge-lora", str(adapter_dir), "--output", str(precious)]) == 4
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(str(p.relative_to(precious)) for p in precious.rglob("*")) == [
        "sub",
        "sub/data.bin",
        "thesis.txt",
    ]


def test_overwrite_writes_the_model_and_deletes_nothing_else(adapter_dir, tmp_path):
    precious = user_tree(tmp_path / "precious")
    (precious / "config.json").write_text("an older config")
    assert main(["merge-lora", str(adapter_dir), "--output", str(precious), "--overwrite"]) == 0
    assert (precious / "thesis.txt").read_text() == NOTES
    assert (precious / "sub" / "data.bin").read_text() == NOTES
    assert (precious / "model.safetensors").exists()
    assert json.loads((precious / "config.json").read_text())["model_type"]  # replaced
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(precious)


@pytest.mark.parametrize("output", [".", "..", "{cwd}"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_working_directory_and_its_parents_are_never_written(
    adapter_dir, tmp_path, monkeypatch, capsys, output, overwrite
):
    parent = user_tree(tmp_path / "parent")
    inner = user_tree(parent / "inner")
    monkeypatch.chdir(inner)
    target = output.replace("{cwd}", str(inner))
    assert main(["merge-lora", str(adapter_dir), "--output", target, *overwrite]) == 4
    assert "working directory" in capsys.readouterr().err
    assert sorted(p.name for p in parent.iterdir()) == ["inner", "sub", "thesis.txt"]
    assert sorted(p.name for p in inner.iterdir()) == ["sub", "thesis.txt"]


def test_merging_again_needs_overwrite_and_the_adapter_dir_is_never_the_target(adapter_dir, capsys):
    assert main(["merge-lora", str(adapter_dir)]) == 0
    merged = adapter_dir / "merged"
    assert (merged / "model.safetensors").exists() and (merged / ".sft-output").exists()
    assert main(["merge-lora", str(adapter_dir)]) == 4
    assert main(["merge-lora", str(adapter_dir), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["merge-lora", str(adapter_dir), "--output", str(adapter_dir), "--overwrite"]) == 4
    assert "adapter's or the base model's own directory" in capsys.readouterr().err
