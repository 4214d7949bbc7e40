from __future__ import annotations

import json
import subprocess
import sys

from sft.config import load_config_text
from sft.data.pipeline import prepare_datasets
from sft.manager import SftPlugins
from sft.testing import build_tokenizer


def test_installed_plugin_is_found_through_its_entry_point():
    plugins = SftPlugins.load(environ={})
    assert plugins.records["dolly"].package == "sft-dolly"
    assert plugins.prompt_strategies().owner("dolly") == "dolly"
    listed = subprocess.run(
        [sys.executable, "-m", "sft", "plugins", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    row = {r["name"]: r for r in json.loads(listed.stdout)}["dolly"]
    assert row["provides"]["prompt_strategies"] == ["dolly"] and row["status"] == "ok"


def test_dolly_rows_train_the_response(tmp_path):
    rows = [
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short."},
        {"instruction": "Say hi.", "response": "Hi!"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config_text(
        f'base_model = "x"\nshuffle_merged_datasets = false\n[[datasets]]\npath = "{tmp_path}/d.jsonl"\n'
        'type = "dolly"\ndolly_context_heading = "Background"\n',
        plugins=SftPlugins.load(environ={}),
    )
    tokenizer = build_tokenizer(eos_token="</s>")
    train = prepare_datasets(
        config, tokenizer, SftPlugins.load(environ={}), show_progress=False
    ).train
    first, second = train
    trained = [
        t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100
    ]
    assert tokenizer.decode(trained) == "Short.</s>"
    assert "### Background:\nA long text." in tokenizer.decode(first["input_ids"])
    assert "### Background" not in tokenizer.decode(second["input_ids"])
