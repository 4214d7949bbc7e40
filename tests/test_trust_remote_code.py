"""A model directory is data, not code: `sft chat DIR` and `sft merge-lora DIR` run the model's own
Python code only with `--trust-remote-code`, whatever the directory's `sft_config.yaml` says; a
user's own config file may turn it on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sft.cli import main


@pytest.fixture
def trust_flags(monkeypatch) -> list[bool]:
    """The `trust_remote_code` of every model load (the real load still happens)."""
    from transformers import AutoModelForCausalLM

    seen: list[bool] = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return seen


@pytest.fixture
def model_dir(tiny_project) -> Path:
    """A downloaded-looking model directory whose sft_config.yaml asks for remote code."""
    directory = tiny_project.tmp_path / "tiny"
    (directory / "sft_config.yaml").write_text(
        f"base_model: {directory}\ntrust_remote_code: true\n"
    )
    return directory


@pytest.fixture
def adapter_dir(tiny_project) -> Path:
    """An adapter whose parent's sft_config.yaml (as `sft run` leaves it) asks for remote code."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_project.tmp_path / "tiny"
    model = AutoModelForCausalLM.from_pretrained(base)
    adapter = tiny_project.tmp_path / "run" / "checkpoint-2"
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter.parent / "sft_config.yaml").write_text(
        f"base_model: {base}\ntrust_remote_code: true\n"
    )
    return adapter


CHAT = ("--prompt", "hi", "--max-new-tokens", "2")


def test_chat_on_a_directory_ignores_its_trust_remote_code(model_dir, trust_flags):
    assert main(["chat", str(model_dir), *CHAT]) == 0
    assert trust_flags == [False]


def test_chat_trusts_remote_code_only_with_the_flag(model_dir, trust_flags):
    assert main(["chat", str(model_dir), *CHAT, "--trust-remote-code"]) == 0
    assert trust_flags == [True]


def test_merge_lora_on_a_directory_ignores_its_parents_trust_remote_code(
    adapter_dir, trust_flags, tmp_path
):
    assert main(["merge-lora", str(adapter_dir), "--output", str(tmp_path / "merged")]) == 0
    assert trust_flags == [False]
    assert (
        main(
            [
                "merge-lora",
                str(adapter_dir),
                "--output",
                str(tmp_path / "m2"),
                "--trust-remote-code",
            ]
        )
        == 0
    )
    assert trust_flags == [False, True]


def test_a_users_own_config_may_trust_remote_code(model_dir, trust_flags, tmp_path):
    trained = shutil.copytree(model_dir, tmp_path / "trained")
    config = tmp_path / "mine.toml"
    config.write_text(
        f'base_model = "{model_dir}"\noutput_dir = "{trained}"\ntrust_remote_code = true\n'
        '[[datasets]]\npath = "data.jsonl"\ntype = "chat_template"\n'
    )
    assert main(["chat", str(config), *CHAT]) == 0
    assert trust_flags == [True]


def test_an_adapter_without_its_config_names_the_missing_file(adapter_dir, capsys):
    (adapter_dir.parent / "sft_config.yaml").unlink()
    assert main(["chat", str(adapter_dir), *CHAT]) == 6
    err = capsys.readouterr().err
    assert "no sft_config.yaml" in err and "base model" in err and "sft.save" not in err
