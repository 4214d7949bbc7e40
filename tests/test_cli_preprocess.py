"""`sft preprocess` as a user runs it: summary, cache, --debug view and self-check."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import write_jsonl
from test_cli import run_sft

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_project(tmp_path: Path) -> Path:
    from sft.testing import build_tokenizer

    tokenizer = build_tokenizer(
        special_tokens=["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>"
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(5)
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    config = tmp_path / "config.toml"
    config.write_text(
        f'base_model = "{tmp_path / "tok"}"\nchat_template = "chatml"\n'
        f'dataset_prepared_path = "{tmp_path / "prepared"}"\n'
        '[[datasets]]\npath = "chat.jsonl"\ntype = "chat_template"\n'
    )
    return config


def test_preprocess_prints_a_summary_and_reuses_the_cache(tmp_path):
    config = make_project(tmp_path)
    first = run_sft("preprocess", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "chat.jsonl" in first.stdout and "written to" in first.stdout
    second = run_sft("preprocess", str(config), cwd=tmp_path)
    assert "loaded from" in second.stdout
    summary = json.loads(next((tmp_path / "prepared").glob("*/summary.json")).read_text())
    assert summary["train_samples"] == 5


def test_preprocess_debug_is_readable_without_a_terminal(tmp_path):
    config = make_project(tmp_path)
    result = run_sft(
        "preprocess", str(config), "--debug", "--debug-num-examples", "2", "--ids", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert not ANSI.search(result.stdout), "colour codes in a non-terminal log"
    trained = re.findall(r"⟦(.*?)⟧", result.stdout, flags=re.S)
    assert [re.sub(r"\(\d+\)", "", t) for t in trained] == [
        "Answer 0.<|im_end|>",
        "Answer 1.<|im_end|>",
    ]
    assert "<|im_end|>(" in result.stdout  # ids shown
    assert "✓ self-check passed" in result.stdout
    assert "self-check: 2/2 examples passed" in result.stdout
    assert "Saving the dataset" not in result.stderr  # our progress only


def test_preprocess_reports_a_bad_row_with_file_and_row(tmp_path):
    config = make_project(tmp_path)
    with (tmp_path / "chat.jsonl").open("a") as handle:
        handle.write('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    result = run_sft("preprocess", str(config), cwd=tmp_path)
    assert result.returncode == 5
    assert "chat.jsonl, row 6" in result.stderr and "unknown role 'wizard'" in result.stderr
    assert "Traceback" not in result.stderr
