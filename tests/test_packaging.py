"""The package layout: every plugin package is listed and registered as an entry point."""

from __future__ import annotations

import sys

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def plugin_packages() -> set[str]:
    return {
        "sft.plugins." + ".".join(init.parent.relative_to(REPO / "plugins").parts)
        for init in (REPO / "plugins").rglob("__init__.py")
        if init.parent != REPO / "plugins"
    }


def test_every_plugin_package_is_in_the_explicit_package_list():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = plugin_packages() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_every_core_package_is_in_the_explicit_package_list():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    core = {
        ".".join(["sft", *init.parent.relative_to(REPO / "core").parts])
        for init in (REPO / "core").rglob("__init__.py")
    }
    assert core <= listed, sorted(core - listed)


def test_every_top_level_plugin_has_an_entry_point_and_every_entry_point_a_package():
    entry_points = PYPROJECT["project"]["entry-points"]["sft.plugins"]
    top_level = {p for p in plugin_packages() if p.count(".") == 2}
    assert {v for v in entry_points.values()} == top_level


def test_torch_is_not_pinned():
    torch = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert torch and "==" not in torch[0]


def test_the_wheel_ships_every_module_template_preset_and_the_typed_marker(tmp_path):
    import subprocess
    import zipfile

    build = ["pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([sys.executable, "-m", *build, "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {"sft/py.typed"}
    for source, package in ((REPO / "core", "sft"), (REPO / "plugins", "sft/plugins")):
        for path in source.rglob("*"):
            if path.suffix in (".py", ".jinja", ".json") and "__pycache__" not in path.parts:
                expected.add(f"{package}/{path.relative_to(source).as_posix()}")
    assert expected - shipped == set()
