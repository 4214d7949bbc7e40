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
