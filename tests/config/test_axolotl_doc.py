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
    status = axolotl_doc.status_of
    rows = [f"| `{key}` | {status(e)} |" for key, e in axolotl.UNSUPPORTED_ROOT_KEYS.items()]
    rows += [
        f"| `datasets[].{key}` | {status(e)} |"
        for key, e in axolotl.UNSUPPORTED_DATASET_KEYS.items()
    ]
    rows += [f"| `{key}` |" for key in axolotl.MAPPED_KEYS]
    missing = [row for row in rows if row not in text]
    assert not missing


def test_keys_that_change_nothing_say_so_on_the_page(plugins):
    text = axolotl_markdown(plugins)
    speed = text.split("## Accepted, no effect: speed only")[1].split("\n## ")[0]
    assert "| `lora_qkv_kernel` | Axolotl's fused Triton LoRA kernel" in speed
    assert "| `flash_attn_rms_norm` | Flash-attn's RMSNorm kernel; for the speed, use" in speed
    assert "`expert_parallel_size`" not in speed
    assert "| `lora_mlp_kernel` | accepted, no effect: speed only |" in text
    assert "| `expert_parallel_size` | supported (plugin `fsdp`) |" in text
    assert "| `context_parallel_size` | refused |" in text
    assert "| `quantize_moe_experts` | supported |" in text
    assert (
        "| `eval_max_new_tokens` | refused; no effect (a warning) while `eval_table_size` / "
        "`do_causal_lm_eval` are blank |"
    ) in text
    zero = 'As in Axolotl, 0 means "none" for `eval_steps`, `evals_per_epoch`, `save_steps`, '
    assert zero + "`saves_per_epoch`." in text


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
