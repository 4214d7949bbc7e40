"""docs/axolotl.md is generated from the schema and the Axolotl key tables, and kept current."""

from __future__ import annotations

import pytest
from conftest import REPO

from sft.config import axolotl, axolotl_doc
from sft.config.axolotl_doc import axolotl_markdown


def test_the_committed_page_is_up_to_date(plugins):
    current = (REPO / "docs" / "axolotl.md").read_text(encoding="utf-8")
    assert current == axolotl_markdown(plugins), (
        "docs/axolotl.md is stale: run `python -m sft.config.axolotl_doc --write`"
    )


def test_every_refused_and_mapped_key_is_on_the_page(plugins):
    text = axolotl_markdown(plugins)
    rows = [f"| `{key}` | refused |" for key in axolotl.UNSUPPORTED_ROOT_KEYS]
    rows += [f"| `datasets[].{key}` | refused |" for key in axolotl.UNSUPPORTED_DATASET_KEYS]
    rows += [f"| `{key}` |" for key in axolotl.MAPPED_KEYS]
    missing = [row for row in rows if row not in text]
    assert not missing


def test_every_key_sft_reads_lands_in_exactly_one_topic(plugins):
    for scope, name, _, _ in axolotl_doc.supported_keys(plugins):
        if scope == "root" and name not in axolotl.MAPPED_KEYS:
            assert axolotl_doc.topic_of(name) in axolotl_doc.TOPICS  # raises when 0 or 2+


def test_every_row_of_the_page_has_notes(plugins):
    for line in axolotl_markdown(plugins).splitlines():
        if line.startswith("| `"):
            assert line.rstrip(" |").split("|")[-1].strip(), f"no notes: {line}"


def test_a_key_no_rule_claims_is_reported():
    with pytest.raises(ValueError, match="'mystery_key' is claimed by no topic"):
        axolotl_doc.topic_of("mystery_key")


def test_the_module_prints_the_page_or_writes_it(plugins, capsys, tmp_path, monkeypatch):
    assert axolotl_doc.main([]) == 0
    assert capsys.readouterr().out == axolotl_markdown(plugins)
    target = tmp_path / "axolotl.md"
    monkeypatch.setattr(axolotl_doc, "DOC_PATH", target)
    assert axolotl_doc.main(["--write"]) == 0
    assert target.read_text(encoding="utf-8") == axolotl_markdown(plugins)
