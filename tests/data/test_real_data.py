"""The real public datasets in ../shared/data through every format, with a test tokenizer and
(slow) with SmolLM2's own tokenizer. Summaries are printed (run with -s to read them)."""

from __future__ import annotations

import json

import pytest
from conftest import shared_data, write_jsonl
from rich.console import Console

from sft.data.pipeline import prepare_datasets
from sft.plugins.chat_template.templates import builtin_template
from sft.testing import build_tokenizer

GLAIVE_KEYS = (
    'field_messages = "conversations"\n'
    'message_property_mappings = { role = "from", content = "value" }\n'
    'roles = { user = ["human"], assistant = ["gpt", "function_call"], tool = ["observation"] }\n'
)


def alpaca_as_messages(tmp_path):
    rows = json.loads(shared_data("alpaca_en_demo.json").read_text())
    converted = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": r["instruction"] + (("\n\n" + r["input"]) if r["input"] else ""),
                },
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in rows
    ]
    return write_jsonl(tmp_path / "alpaca_messages.jsonl", converted)


def all_datasets_config(tmp_path, sequence_len: int = 1024) -> str:
    return f"""
sequence_len = {sequence_len}
[[datasets]]
path = "{shared_data("alpaca_en_demo.json")}"
type = "alpaca"
[[datasets]]
path = "{alpaca_as_messages(tmp_path)}"
type = "chat_template"
[[datasets]]
path = "{shared_data("glaive_toolcall_en_demo.json")}"
type = "chat_template"
{GLAIVE_KEYS}
[[datasets]]
path = "{shared_data("identity.json")}"
type = "alpaca"
[[datasets]]
path = "{shared_data("c4_demo.jsonl")}"
type = "completion"
"""


EXPECTED_SHARE = {  # plausible trainable-token shares per dataset
    "alpaca_en_demo.json": (0.4, 0.95),
    "alpaca_messages.jsonl": (0.4, 0.95),
    "glaive_toolcall_en_demo.json": (0.1, 0.7),
    "identity.json": (0.1, 0.7),
    "c4_demo.jsonl": (0.99, 1.0),
}


def check_summary(summary, rows_expected=True):
    Console(width=160).print(summary.table())
    for dataset in summary.datasets:
        name = dataset.name.rsplit("/", 1)[-1]
        low, high = EXPECTED_SHARE[name]
        assert low <= dataset.trainable_share <= high, (name, dataset.trainable_share)
        assert dataset.rows_kept >= 0.9 * dataset.rows_in, (name, dataset.dropped)
        assert "no trainable tokens" not in dataset.dropped, name


def test_shared_datasets_with_a_test_tokenizer(make_config, tmp_path):
    tokenizer = build_tokenizer(
        chat_template=builtin_template("qwen"),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        bos_token=None,
        vocab_size=2048,
    )
    prepared = prepare_datasets(
        make_config(all_datasets_config(tmp_path, 4096)), tokenizer, show_progress=False
    )
    check_summary(prepared.summary)
    glaive = next(d for d in prepared.summary.datasets if "glaive" in d.name)
    assert (
        glaive.rows_kept + glaive.dropped.get("longer than sequence_len", 0) == 300
    )  # no row errors


@pytest.mark.slow
def test_shared_datasets_with_smollm2s_tokenizer(make_config, tmp_path, smollm2_gguf):
    from sft.tokenizer import load_tokenizer

    config = make_config(
        all_datasets_config(tmp_path, 2048),
        f"base_model={smollm2_gguf}",
        "chat_template=qwen",
    )
    tokenizer = load_tokenizer(config)
    assert tokenizer.eos_token == "<|im_end|>"
    prepared = prepare_datasets(config, tokenizer, show_progress=False)
    check_summary(prepared.summary)
