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


def test_sample_lengths_are_where_positions_restart_in_each_row():
    import torch

    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2: a cut first sample
    assert segments.sample_lengths(positions, 2, 6) == [[3, 2, 1], [2, 4]]
    shared = torch.tensor([[0, 1, 0, 1]])  # one position row for the whole batch
    assert segments.sample_lengths(shared, 2, 4) == [[2, 2], [2, 2]]


def test_sample_lengths_are_recomputed_for_other_or_changed_positions():
    """The lengths kept from the last call (every layer gets the same position tensor) are
    never those of another tensor, nor of the same tensor after an in-place change."""
    import torch

    positions = torch.tensor([[0, 1, 2, 3]])
    assert segments.sample_lengths(positions, 1, 4) == [[4]]
    positions[0, 2] = 0
    assert segments.sample_lengths(positions, 1, 4) == [[2, 2]]
    assert segments.sample_lengths(torch.tensor([[0, 1, 2, 0]]), 1, 4) == [[3, 1]]
    assert segments.sample_lengths(positions, 2, 4) == [[2, 2], [2, 2]]
    del positions
    assert segments.sample_lengths(torch.tensor([[0, 0, 0, 0]]), 1, 4) == [[1, 1, 1, 1]]


def test_turning_it_off_where_nothing_packs_on_sdpa_is_a_warning(tiny_project):
    (warning,) = [w for w in tiny_project("sdpa_per_sample=false").warnings]
    assert warning.path == "sdpa_per_sample" and "does not pack" in warning.message
    assert not tiny_project("sdpa_per_sample=false", "sample_packing=true").warnings


def test_short_bf16_segments_on_cpu_attend_in_float32_also_under_autocast():
    """Below CPU_UPCAST_BELOW tokens a bf16 segment is computed in fp32 (faster on CPU, and
    more precise): the output is the fp32 attention rounded once to bf16; longer segments and
    fp32 models are untouched."""
    import types

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    short, long = 40, segments.CPU_UPCAST_BELOW
    length = short + long
    query = torch.randn(1, 4, length, 16, dtype=torch.bfloat16)
    key, value = torch.randn(2, 1, 2, length, 16, dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(short), torch.arange(long)])[None]
    module = types.SimpleNamespace(training=False, is_causal=True)

    def attend(q, k, v, start, end):
        return F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True,
            enable_gqa=True,
        )  # fmt: skip

    for context in (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autocast("cpu", enabled=False),
    ):
        with context:
            output, _ = segments.segment_attention(
                module, query, key, value, None, position_ids=positions
            )
        output = output.transpose(1, 2)
        assert output.dtype == torch.bfloat16
        in_float32 = attend(query.float(), key.float(), value.float(), 0, short)
        assert torch.equal(output[:, :, :short], in_float32.to(torch.bfloat16))
        with context:
            native = attend(query, key, value, short, length)
        assert torch.equal(output[:, :, short:], native)

    fp32 = [t.float() for t in (query, key, value)]
    output, _ = segments.segment_attention(module, *fp32, None, position_ids=positions)
    assert torch.equal(output.transpose(1, 2)[:, :, :short], attend(*fp32, 0, short))


def test_segment_attention_equals_the_block_diagonal_mask_in_output_and_gradients():
    """Rows with different sample boundaries (a one-token sample, a row that is one sample),
    grouped key/value heads and a value head size unlike the query's: the output and the
    gradients of query, key and value are those of SDPA with the block-diagonal causal mask."""
    import types

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    lengths = [[5, 1, 10], [16], [7, 9]]
    length = 16
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    query = torch.randn(3, 4, length, 8, requires_grad=True)
    key = torch.randn(3, 2, length, 8, requires_grad=True)
    value = torch.randn(3, 2, length, 6, requires_grad=True)
    module = types.SimpleNamespace(training=True, is_causal=True)

    output, _ = segments.segment_attention(module, query, key, value, None, position_ids=positions)
    assert output.shape == (3, length, 4, 6)
    weights = torch.randn_like(output)
    per_sample = torch.autograd.grad((output * weights).sum(), (query, key, value))

    sample = torch.stack(
        [torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]
    )
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (sample[:, :, None] == sample[:, None, :]) & causal  # (batch, query, key)
    masked = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask[:, None], enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(output, masked)
    expected = torch.autograd.grad((masked * weights).sum(), (query, key, value))
    for name, got, want in zip("qkv", per_sample, expected, strict=True):
        torch.testing.assert_close(got, want, msg=name)
