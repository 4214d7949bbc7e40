"""sft-inductor: compiled RMSNorm and RoPE give the eager results, found and turned on by keys."""

from __future__ import annotations

import pytest
import sft_inductor
import torch

from sft import plugin
from sft.testing import build_model, listed_plugins


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_compiled_rms_norm_and_rope_match_eager_loss_and_gradients(sft_tokenizer):
    eager = build_model(sft_tokenizer)
    compiled = build_model(sft_tokenizer)
    compiled.load_state_dict(eager.state_dict())
    assert sft_inductor.compile_rms_norms(compiled) == len(sft_inductor.rms_norms(eager)) > 0
    modeling = sft_inductor.rotary_module(compiled)
    original = modeling.apply_rotary_pos_emb
    try:
        sft_inductor.compile_rope(modeling)
        assert modeling.apply_rotary_pos_emb is not original
        ids = torch.randint(
            0, sft_tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
        )
        compiled_loss, compiled_grads = loss_and_grads(compiled, ids)
        modeling.apply_rotary_pos_emb = original  # the eager model runs the eager function
        eager_loss, eager_grads = loss_and_grads(eager, ids)
    finally:
        modeling.apply_rotary_pos_emb = original
    assert compiled_loss == pytest.approx(eager_loss.item(), abs=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    norm = sft_inductor.rms_norms(compiled)[0]
    assert norm._compiled_call_impl is not None  # its forward runs through the compiled graph


def test_a_short_run_with_both_keys_trains_like_the_plain_run(sft_config, sft_model_dir):
    from sft.train.run import train

    rows = [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(8)]
    text = (
        'output_dir = "{tmp}/%s"\nmax_steps = 2\nmicro_batch_size = 2\nlogging_steps = 1\n'
        'learning_rate = 0.01\nseed = 1\n[[datasets]]\npath = "{tmp}/data.jsonl"\n'
        'type = "completion"\n'
    )
    plain = train(sft_config(text % "plain", rows=rows))
    fused = train(
        sft_config(text % "fused", "inductor_rms_norm=true", "inductor_rope=true", rows=rows)
    )
    assert fused.global_step == 2
    assert fused.train_loss == pytest.approx(plain.train_loss, rel=1e-4)


def test_keys_turn_the_kernel_on_and_an_unavailable_compiler_is_refused(sft_config, monkeypatch):
    config = sft_config(
        'inductor_rope = true\n[[datasets]]\npath = "{tmp}/data.jsonl"\n',
        rows=[{"input_ids": [1, 2], "labels": [1, 2]}],
    )
    assert sft_inductor.enabled_keys(config) == ["inductor_rope"]
    monkeypatch.setattr(sft_inductor.shutil, "which", lambda name: None)
    with pytest.raises(plugin.ConfigError) as error:
        sft_config('inductor_rms_norm = true\n[[datasets]]\npath = "{tmp}/data.jsonl"\n')
    (problem,) = [p for p in error.value.problems if p.path == "inductor_rms_norm"]
    assert "kernel 'inductor' (plugin inductor) is unavailable on this machine" in problem.message
    assert "needs a C++ compiler" in problem.message


def test_the_plugin_is_listed_with_its_kernel_and_keys():
    row = listed_plugins()["inductor"]
    assert row["package"] == "sft-inductor" and row["status"] == "ok"
    assert row["provides"]["kernels"] == ["inductor"]
    assert row["provides"]["config keys"] == ["inductor_rms_norm", "inductor_rope"]
