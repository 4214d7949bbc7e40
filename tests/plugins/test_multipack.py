"""The multipack packer: valid bins, first-fit decreasing, limits, efficiency on real chat data."""

from __future__ import annotations

import json
import random
import time

import pytest
from conftest import shared_data, write_jsonl

from sft.config import load_config_text
from sft.data.packing import pack_dataset
from sft.data.pipeline import prepare_datasets
from sft.errors import ConfigError
from sft.plugins.multipack import first_fit, next_fit


def check_bins(bins, lengths, capacity, max_items):
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every sample once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(len(b) <= max_items for b in bins)


def test_first_fit_decreasing_is_optimal_on_a_known_case():
    lengths = [6, 4, 5, 5, 3, 7]  # 30 tokens, capacity 10: three full bins
    bins = first_fit(lengths, 10, 200)
    check_bins(bins, lengths, 10, 200)
    assert len(bins) == 3


def test_sequential_packing_keeps_dataset_order_across_bins():
    bins = next_fit([6, 6, 3, 3, 9, 1, 1, 1], 10, 3)
    assert bins == [[0], [1, 2], [3], [4, 5], [6, 7]]
    check_bins(bins, [6, 6, 3, 3, 9, 1, 1, 1], 10, 3)
    with pytest.raises(ValueError, match="more than a bin"):
        next_fit([5, 11], 10, 200)


def test_bin_size_limit_and_too_long_samples():
    bins = first_fit([1] * 10, 100, 3)
    check_bins(bins, [1] * 10, 100, 3)
    assert len(bins) == 4
    with pytest.raises(ValueError, match="more than a bin"):
        first_fit([5, 11], 10, 200)


def test_random_lengths_pack_validly_and_densely():
    rng = random.Random(0)
    lengths = [rng.randint(10, 900) for _ in range(5000)]
    bins = first_fit(lengths, 2048, 200)
    check_bins(bins, lengths, 2048, 200)
    assert sum(lengths) / (len(bins) * 2048) > 0.99


def test_packing_a_hundred_thousand_lengths_is_fast():
    rng = random.Random(1)
    lengths = [rng.randint(20, 1500) for _ in range(100_000)]
    start = time.perf_counter()
    bins = first_fit(lengths, 2048, 200)
    # ~0.3 s here: the bound leaves room for a loaded machine, not for a quadratic packer.
    assert time.perf_counter() - start < 15
    check_bins(bins, lengths, 2048, 200)
    assert sum(lengths) / (len(bins) * 2048) > 0.99


def test_packing_needs_a_backend_that_keeps_samples_apart(plugins):
    from sft import hookimpl
    from sft.components import AttentionBackend

    class NoPacking:
        @hookimpl
        def sft_register_attention_backends(self, register):
            register(AttentionBackend("naive", "eager", packing=None))

    plugins.register(NoPacking(), name="naive")
    with pytest.raises(ConfigError, match="cannot keep packed samples apart"):
        load_config_text(
            'base_model = "m"\nsample_packing = true\nattn_implementation = "naive"\n[[datasets]]\npath = "a"\n',
            plugins=plugins,
        )


def test_efficiency_on_alpaca_chat_at_2048_is_at_least_98_percent(make_config, tmp_path, plugins):
    from sft.plugins.chat_template.templates import builtin_template
    from sft.testing import build_tokenizer

    rows = json.loads(shared_data("alpaca_en_demo.json").read_text())
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""),
                    },
                    {"role": "assistant", "content": r["output"]},
                ]
            }
            for r in rows
        ],
    )
    tokenizer = build_tokenizer(
        chat_template=builtin_template("chatml"),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        vocab_size=2048,
    )
    config = make_config(
        'sequence_len = 2048\nsample_packing = true\n[[datasets]]\npath = "{tmp}/chat.jsonl"\ntype = "chat_template"\n'
    )
    train = prepare_datasets(config, tokenizer, show_progress=False).train
    packed, stats = pack_dataset(train, 2048, config, plugins)
    print(stats.render())
    assert stats.efficiency >= 0.98
    row = packed[0]
    assert len(row["input_ids"]) <= 2048 and row["position_ids"][0] == 0
