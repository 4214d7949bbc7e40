"""sft-dolly's tests, on the fixtures sft's pytest plugin provides (sft_config, sft_prepare, ...)."""

from __future__ import annotations

import pytest

from sft import plugin
from sft.testing import listed_plugins

ROWS = [
    {"instruction": "Summarise.", "context": "A long text.", "response": "Short."},
    {"instruction": "Say hi.", "response": "Hi!"},
]
CONFIG = """
shuffle_merged_datasets = false

[[datasets]]
path = "{tmp}/data.jsonl"
type = "dolly"
dolly_context_heading = "Background"
"""


def trained_text(tokenizer, row) -> str:
    ids = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0]
    return tokenizer.decode(ids)


def test_the_plugin_is_found_through_its_entry_point(sft_plugins):
    assert sft_plugins.records["dolly"].package == "sft-dolly"
    assert sft_plugins.prompt_strategies().owner("dolly") == "dolly"
    row = listed_plugins()["dolly"]
    assert row["provides"]["prompt_strategies"] == ["dolly"] and row["status"] == "ok"


def test_the_response_and_eos_are_trained_and_the_context_is_shown(
    sft_config, sft_prepare, sft_tokenizer
):
    first, second = sft_prepare(sft_config(CONFIG, rows=ROWS))
    assert trained_text(sft_tokenizer, first) == "Short.<|im_end|>"
    assert trained_text(sft_tokenizer, second) == "Hi!<|im_end|>"
    assert "### Background:\nA long text." in sft_tokenizer.decode(first["input_ids"])
    assert "### Background" not in sft_tokenizer.decode(second["input_ids"])
    assert plugin.IGNORE_INDEX in first["labels"]


def test_a_row_without_a_response_is_refused_with_its_row(sft_config, sft_prepare):
    rows = [*ROWS, {"instruction": "No answer."}]
    with pytest.raises(plugin.DataError) as error:
        sft_prepare(sft_config(CONFIG, rows=rows))
    assert error.value.row == 3 and "missing field 'response'" in str(error.value)


def test_the_heading_key_belongs_to_dolly_datasets_only(sft_config):
    text = CONFIG.replace('type = "dolly"', 'type = "completion"')
    with pytest.raises(plugin.ConfigError) as error:
        sft_config(text, rows=ROWS)
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].dolly_context_heading"
    assert "belongs to dataset type 'dolly' (plugin dolly)" in problem.message
