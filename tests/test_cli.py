"""The `sft` command as a user runs it: exit codes, red errors without tracebacks, JSON output."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_distribution

JSON_KEYS = {"name", "package", "version", "hooks", "provides", "status", "error"}


def run_sft(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
):
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("SFT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "sft", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def test_version():
    result = run_sft("--version")
    assert result.returncode == 0 and result.stdout.startswith("sft ")


def test_help_lists_only_real_commands():
    result = run_sft("--help")
    assert result.returncode == 0
    assert "validate" in result.stdout and "plugins" in result.stdout


def test_plugins_list_json_has_stable_keys_and_builtins():
    result = run_sft("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert all(set(row) == JSON_KEYS for row in rows.values())
    assert rows["adamw"]["provides"]["optimizers"] == ["adamw_torch", "adamw_torch_fused"]
    assert rows["sdpa"]["provides"]["attention_backends"] == ["sdpa"]
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["package"] == "sft-train"


def test_a_broken_distribution_is_a_row_with_its_error_and_exit_0(tmp_path):
    site = make_distribution(
        tmp_path / "site",
        "sft-broken-demo",
        {"broken_demo": "broken_demo_plugin"},
        {"broken_demo_plugin": "raise ImportError('needs a GPU library')\n"},
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = run_sft("plugins", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    row = {r["name"]: r for r in json.loads(result.stdout)}["broken_demo"]
    assert row["status"] == "error"
    assert row["package"] == "sft-broken-demo"
    assert "needs a GPU library" in row["error"]
    table = run_sft("plugins", "list", "--hooks", env=env)
    assert table.returncode == 0
    assert "broken_demo" in table.stdout and "ImportError" in table.stdout


def test_validate_reports_every_problem_with_exit_4_and_no_traceback(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        textwrap.dedent(
            """\
            base_model = "m"
            lerning_rate = 1e-4
            micro_batch_size = "four"

            [[datasets]]
            path = "x.jsonl"
            type = "no_such_format"
            """
        )
    )
    result = run_sft("validate", str(config))
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert "3 problems in" in result.stderr
    assert "lerning_rate (line 2): unknown key; did you mean 'learning_rate'?" in result.stderr
    assert "micro_batch_size (line 3): expected an integer" in result.stderr
    assert "datasets[0].type (line 7): unknown datasets[].type 'no_such_format'" in result.stderr
    with_trace = run_sft("--traceback", "validate", str(config))
    assert "Traceback" in with_trace.stderr and with_trace.returncode == 4


def test_validate_a_good_config(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("base_model: m\ndatasets:\n  - path: a.jsonl\n")
    (tmp_path / "a.jsonl").write_text("")
    result = run_sft("validate", str(config), "--set", "optimizer=adamw_torch_fused", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout and "adamw_torch_fused" in result.stdout


def test_validate_finds_a_missing_dataset_file_before_any_model_load(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'base_model = "m"\n[[datasets]]\npath = "org/hub-id"\n'
        '[[datasets]]\npath = "data/train.jsonl"\ntype = "chat_template"\n'
    )
    result = run_sft("validate", str(config), cwd=tmp_path)
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert "datasets[1].path (line 5): file not found: data/train.jsonl" in result.stderr
    assert f"read from the working directory ({tmp_path})" in result.stderr
    portable = run_sft("validate", "--portable", str(config), cwd=tmp_path)
    assert portable.returncode == 0, portable.stderr  # the file may exist where it will run


def test_validate_refuses_a_yaml_alias_bomb_quickly(tmp_path):
    lines = ["base_model: m", "datasets:", "  - path: a", "    storage_options:"]
    lines.append(f"      a: &a [{', '.join(['lol'] * 10)}]")
    for prev, name in itertools.pairwise("abcdef"):  # 10**6 leaves in 400 bytes
        lines.append(f"      {name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(lines) + "\n")
    try:
        result = run_sft("validate", str(config), timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("sft validate did not finish within 10 s on a YAML alias bomb")
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert "aliases (*name) expand to more than 100,000 values" in result.stderr


def test_usage_errors_exit_4():
    assert run_sft("validate").returncode == 4
    assert run_sft("validate", "missing.toml").returncode == 4
    assert run_sft("no-such-command").returncode == 4


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["plugins", "list"], ["plugins", "list", "--json"], ["validate", "{config}"]],
)
def test_front_door_never_imports_torch_or_transformers(argv, tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text('base_model = "m"\n[[datasets]]\npath = "a"\n')
    argv = [a.replace("{config}", str(config)) for a in argv]
    code = textwrap.dedent(
        f"""
        import sys
        from sft.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        heavy = [m for m in ("torch", "transformers", "datasets", "peft") if m in sys.modules]
        print("HEAVY:", heavy)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert "HEAVY: []" in result.stdout, result.stdout + result.stderr
