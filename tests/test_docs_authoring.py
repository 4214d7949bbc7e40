"""docs/plugins/authoring.md is a tutorial that runs: its files are contrib/sft-dolly's, and its
commands are run here, in order, in a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import sft.plugin
from tests.conftest import REPO

DOC = REPO / "docs" / "plugins" / "authoring.md"
BLOCK = re.compile(r"(?:<!-- file: (?P<marker>\S+) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
BIN = Path(sys.executable).parent


@attrs.frozen
class Block:
    lang: str
    body: str
    path: str | None  # the file it is, when it is one


def blocks() -> list[Block]:
    found = []
    for match in BLOCK.finditer(DOC.read_text(encoding="utf-8")):
        body, path = match["body"], match["marker"]
        first = body.splitlines()[0] if body else ""
        if (
            path is None
            and match["lang"] in ("python", "toml")
            and re.fullmatch(r"# \S+\.\w+", first)
        ):
            path = first.removeprefix("# ")  # the file is what follows its `# path` line
            body = body.split("\n", 1)[1]
        found.append(Block(match["lang"], body, path))
    return found


def test_every_file_of_the_tutorial_is_the_contrib_plugins_file():
    shown = {b.path: b.body for b in blocks() if b.path and b.path.startswith("sft-dolly/")}
    assert set(shown) == {
        "sft-dolly/pyproject.toml",
        "sft-dolly/src/sft_dolly/__init__.py",
        "sft-dolly/tests/test_dolly.py",
    }
    for path, body in shown.items():
        real = (REPO / "contrib" / path).read_text(encoding="utf-8")
        assert body == real, f"docs/plugins/authoring.md's {path} differs from contrib/{path}"


def test_every_name_of_the_plugin_api_is_documented():
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("## The plugin API") :]
    for name in sft.plugin.__all__:
        assert f"| `{name}` |" in table, f"{name} is not in authoring.md's API table"
        value = getattr(sft.plugin, name)
        if callable(value):
            assert value.__doc__, f"sft.plugin.{name} has no docstring"
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == set(sft.plugin.__all__)


def test_the_tutorial_runs_from_an_empty_directory(tmp_path, sft_model_dir):
    """Writes every file, then runs every command, as a reader would. Three differences, each
    to keep the test offline and fast: pip installs into a target directory (on PYTHONPATH, so
    it shadows the sft-dolly installed in this environment) without dependencies, base_model
    is a tiny local model, and training stops after 2 steps."""
    for block in blocks():
        if block.path:
            file = tmp_path / block.path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(block.body, encoding="utf-8")
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env.pop("SFT_PLUGINS", None)
    tiny = [f"--set=base_model={sft_model_dir}"]
    commands = [
        line.removeprefix("$ ").split()
        for block in blocks()
        if block.lang == "console"
        for line in block.body.splitlines()
        if line.startswith("$ ")
    ]
    assert [c[:2] for c in commands] == [
        ["pip", "install"],
        ["sft", "plugins"],
        ["sft", "validate"],
        ["sft", "preprocess"],
        ["sft", "run"],
        ["pytest", "sft-dolly/tests"],
    ]
    outputs = {}
    for command in commands:
        name, args = command[0], command[1:]
        if name == "pip":
            assert args == ["install", "-e", "./sft-dolly"]
            argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
            argv += ["--no-build-isolation", "--target", str(site), "./sft-dolly"]
        elif name == "pytest":
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        else:
            argv = [str(BIN / "sft"), *args]
            if args[0] in ("validate", "preprocess", "run"):
                argv += tiny
            if args[0] == "run":
                argv += ["--set=max_steps=2"]
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
        outputs[" ".join(command[:2])] = done.stdout + done.stderr

    where = subprocess.run(
        [sys.executable, "-c", "import sft_dolly; print(sft_dolly.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site))  # the tutorial's copy, not the installed one
    listing = outputs["sft plugins"]
    assert re.search(r"dolly\s.*sft-dolly\s.*0\.1\.0", listing)
    assert "self-check: 3/3 examples passed" in outputs["sft preprocess"]
    assert "4 passed" in outputs["pytest sft-dolly/tests"]
    saved = tmp_path / "outputs" / "dolly"
    assert (saved / "adapter_model.safetensors").is_file()
    assert (saved / "tokenizer.json").is_file()


@pytest.mark.parametrize("block", [b for b in blocks() if b.lang == "python" and not b.path])
def test_every_python_snippet_runs(block):
    exec(compile(block.body, str(DOC), "exec"), {})
