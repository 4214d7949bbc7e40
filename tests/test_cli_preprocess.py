"""`sft preprocess` as a user runs it: summary, cache, --debug view and self-check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
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


def sft_in_process(capsys, monkeypatch, cwd: Path, *argv: str) -> tuple[int, str, str]:
    """`sft ARGV` run by `sft.cli.main` in this process: (exit code, stdout, stderr)."""
    from sft.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SFT_DEBUG", raising=False)
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SURROGATE_ROW = json.dumps(  # "\ud800" stays escaped: valid JSON, but not Unicode text
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "\ud800"}]}
)
BAD_LINES = {
    "surrogate": (SURROGATE_ROW, "chat.jsonl, row 6, field 'messages[1].content'", "surrogate"),
    "deep": ("[" * 200_000 + "]" * 200_000, "chat.jsonl, row 6: ", "nested too deeply"),
    "huge-int": ('{"messages": ' + "9" * 5000 + "}", "chat.jsonl, row 6: ", "4300 digits"),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_preprocess_names_file_and_row_of_malformed_input(
    tmp_path, capsys, monkeypatch, plugins, kind
):
    config = make_project(tmp_path)
    line, where, what = BAD_LINES[kind]
    with (tmp_path / "chat.jsonl").open("a") as handle:
        handle.write(line + "\n")
    code, _, err = sft_in_process(capsys, monkeypatch, tmp_path, "preprocess", str(config))
    assert code == 5, err
    assert err.startswith("data error: ") and where in err and what in err
    assert 'invalid_rows = "skip"' in err and "Traceback" not in err


def test_preprocess_skips_and_counts_malformed_input_by_reason(
    tmp_path, capsys, monkeypatch, plugins
):
    config = make_project(tmp_path)
    with (tmp_path / "chat.jsonl").open("a") as handle:
        handle.write("".join(line + "\n" for line, _, _ in BAD_LINES.values()))
    code, out, err = sft_in_process(
        capsys, monkeypatch, tmp_path, "preprocess", str(config), "--set", "invalid_rows=skip"
    )
    assert code == 0, err
    assert "invalid JSON: 2, invalid text: 1" in out
    assert "train samples: 5" in out


def test_preprocess_names_a_truncated_gz(tmp_path, capsys, monkeypatch, plugins):
    import gzip

    config = make_project(tmp_path)
    packed = gzip.compress((tmp_path / "chat.jsonl").read_bytes())
    (tmp_path / "chat.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    code, _, err = sft_in_process(
        capsys, monkeypatch, tmp_path, "preprocess", str(config),
        "--set", "datasets[0].path=chat.jsonl.gz", "--set", "invalid_rows=skip",
    )  # fmt: skip
    assert code == 5, err
    assert "data error: chat.jsonl.gz: corrupt or truncated compressed file" in err
    assert "Traceback" not in err


def test_preprocess_with_no_sample_left_says_what_was_dropped(
    tmp_path, capsys, monkeypatch, plugins
):
    config = make_project(tmp_path)
    code, _, err = sft_in_process(
        capsys, monkeypatch, tmp_path, "preprocess", str(config), "--set", "sequence_len=8"
    )
    assert code == 5, err
    assert "no training sample left after preparing the data" in err
    assert "chat.jsonl: 5 rows in, 0 kept, dropped: longer than sequence_len: 5" in err
    assert "raise sequence_len" in err


def _preprocess_importing(config: Path, cwd: Path) -> tuple[str, list[str]]:
    """`sft preprocess` in a fresh interpreter: its output, and which heavy modules it imported."""
    import ast
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys
        from sft.cli import main
        try:
            main(["preprocess", {str(config)!r}])
        except SystemExit:
            pass
        print("HEAVY:", [m for m in ("torch", "transformers") if m in sys.modules])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    heavy = re.search(r"HEAVY: (\[.*\])", result.stdout)
    assert heavy, result.stdout + result.stderr
    return result.stdout, ast.literal_eval(heavy.group(1))


def test_a_cache_hit_loads_no_tokenizer_and_a_changed_input_does(tmp_path):
    config = make_project(tmp_path)
    first, heavy = _preprocess_importing(config, tmp_path)
    assert "written to" in first and "transformers" in heavy
    again, heavy = _preprocess_importing(config, tmp_path)
    assert "loaded from" in again and heavy == []  # cold start: no transformers, no torch
    # A changed tokenizer file: the tokenizer is loaded again (here, to find the same entry).
    tokenizer_json = tmp_path / "tok" / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text())
    import os

    stat = tokenizer_json.stat()
    os.utime(tokenizer_json, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed, heavy = _preprocess_importing(config, tmp_path)
    assert "loaded from" in changed and "transformers" in heavy
    # A changed key the data does not depend on: the same entry, found the slow way once.
    config.write_text(
        config.read_text().replace("[[datasets]]", "learning_rate = 0.5\n[[datasets]]")
    )
    relearned, heavy = _preprocess_importing(config, tmp_path)
    assert "loaded from" in relearned and "transformers" in heavy
    fast, heavy = _preprocess_importing(config, tmp_path)
    assert "loaded from" in fast and heavy == []
    assert len(list((tmp_path / "prepared").glob("*/complete"))) == 1  # one entry throughout
    # A key the data depends on: a new entry, never the aliased one.
    config.write_text(config.read_text().replace("learning_rate = 0.5", "sequence_len = 64"))
    shorter, _ = _preprocess_importing(config, tmp_path)
    assert "written to" in shorter
    assert len(list((tmp_path / "prepared").glob("*/complete"))) == 2


@pytest.mark.slow
def test_preprocess_with_a_gguf_model_does_not_import_torch(tmp_path, smollm2_gguf, monkeypatch):
    """The GGUF's tokenizer, converted once, loads as the class AutoTokenizer gives it (without
    AutoTokenizer, whose import pulls in torch): a cold `sft preprocess` then needs no torch."""
    from transformers import AutoTokenizer

    from sft.config import load_config_text
    from sft.gguf import gguf_tokenizer_dir
    from sft.tokenizer import load_tokenizer

    config = make_project(tmp_path)
    config.write_text(config.read_text().replace(f'"{tmp_path / "tok"}"', f'"{smollm2_gguf}"', 1))
    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer(load_config_text(config.read_text()))  # converts it, once
    reference = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(str(smollm2_gguf)))
    assert type(tokenizer) is type(reference)
    assert tokenizer.special_tokens_map == reference.special_tokens_map
    assert tokenizer.get_vocab() == reference.get_vocab()
    text = "<|im_start|>user\nWho are you? ünïcode<|im_end|>\n"
    assert tokenizer(text).input_ids == reference(text).input_ids

    out, heavy = _preprocess_importing(config, tmp_path)
    assert "written to" in out and heavy == ["transformers"], out
