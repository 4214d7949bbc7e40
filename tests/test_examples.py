"""Every shipped example config is valid (`sft validate` accepts it)."""

from __future__ import annotations

import pytest
from conftest import REPO

from sft.config import load_config

EXAMPLES = sorted(
    p
    for p in (REPO / "examples").rglob("*")
    if p.suffix in (".toml", ".yaml", ".yml") and "outputs" not in p.parts
)


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {
        "config.toml",
        "qlora.toml",
        "full-finetune.toml",
        "llama-3.1-8b-lora-gpu.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_validates(plugins, path):
    # GPU examples are valid configs; whether this machine can run them is a separate check.
    config = load_config(path, machine_checks=False)
    assert config.datasets
