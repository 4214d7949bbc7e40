"""The sdpa plugin's per-sample attention on packed rows: installed by `sft run`'s model load
exactly when it equals the masked attention (the equality itself: test_packing_invariants)."""

from __future__ import annotations

import pytest

from sft.model import load_model
from sft.plugins.sdpa import segments
from sft.tokenizer import load_tokenizer


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sample_packing=true"], segments.NAME),
        ([], "sdpa"),  # unpacked batches: transformers' sdpa with the padding mask
        (["sample_packing=true", "attn_implementation=eager"], "eager"),
        (["sample_packing=true", "sdpa_per_sample=false"], "sdpa"),  # the mask, by choice
    ],
)
def test_the_run_model_attends_per_sample_only_when_packed_on_sdpa(
    tiny_project, plugins, overrides, expected
):
    config = tiny_project(*overrides)
    model = load_model(config, load_tokenizer(config, plugins), plugins)
    assert model.config._attn_implementation == expected


def test_models_with_windows_caps_or_mixed_layers_keep_the_mask():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    assert segments.applies(LlamaConfig())
    assert not segments.applies(MistralConfig(sliding_window=4))
    assert not segments.applies(MistralConfig(sliding_window=4096), sequence_len=8192)
    assert segments.applies(MistralConfig(sliding_window=4096), sequence_len=4096)
    assert not segments.applies(Gemma2Config())  # soft-capping and sliding layers
    assert not segments.applies(Qwen2Config(use_sliding_window=True, sliding_window=8))


def test_segment_starts_are_where_positions_restart():
    import torch

    assert segments.segment_starts(torch.tensor([0, 1, 2, 0, 1, 0])) == [0, 3, 5]
    assert segments.segment_starts(torch.tensor([3, 4, 0, 1])) == [0, 2]  # a cut first sample


def test_turning_it_off_where_nothing_packs_on_sdpa_is_a_warning(tiny_project):
    (warning,) = [w for w in tiny_project("sdpa_per_sample=false").warnings]
    assert warning.path == "sdpa_per_sample" and "does not pack" in warning.message
    assert not tiny_project("sdpa_per_sample=false", "sample_packing=true").warnings
