from __future__ import annotations

from conftest import REPO

from sft.docgen import config_markdown


def test_config_reference_is_up_to_date(plugins):
    current = (REPO / "docs" / "config.md").read_text()
    assert current == config_markdown(plugins), (
        "docs/config.md is stale: run `python -m sft.docgen`"
    )


def test_every_key_has_a_doc_line(plugins):
    text = config_markdown(plugins)
    for line in text.splitlines():
        if line.startswith("| `"):
            assert line.rstrip(" |").split("|")[-1].strip(), f"undocumented key: {line}"
