"""ReLoRA and jagged learning-rate restarts (plugin `relora`), on the tiny local model."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sft.errors import ConfigError
from sft.train.run import train

RELORA = ("adapter=lora", "lora_target_linear=true", "relora=true", "jagged_restart_steps=2")
QLORA = ("adapter=qlora", "load_in_4bit=true", *RELORA[1:])
SHORT = ("learning_rate=0.01", "logging_steps=1", "jagged_restart_warmup_steps=1")


def _loaded(config):
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer

    return apply_adapter(load_model(config, load_tokenizer(config), get_plugins()), config)


def test_the_jagged_factor_is_axolotls():
    from sft.plugins.relora.schedule import jagged_factor

    factors = [jagged_factor(step, every=4, warmup=2, anneal=2) for step in range(10)]
    # 1 until the first anneal; at a restart 0.001, halfway up after one step; down before
    expected = [1, 1, 1, 0.5005, 0.001, 0.5005, 1, 0.5005, 0.001, 0.5005]
    assert factors == pytest.approx(expected)


def test_jagged_restarts_scale_the_schedule_and_resume_with_it():
    from sft.plugins.relora.schedule import JaggedRestarts, jagged_factor

    def constant(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = JaggedRestarts(constant(optimizer), optimizer, every=3, warmup=2, anneal=1)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr() == [seen[-1]]
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * jagged_factor(s, 3, 2, 1) for s in range(7)])
    assert min(seen) == pytest.approx(0.1 * 0.001)  # the restart at step 3 and 6

    saved = scheduler.state_dict()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    resumed = JaggedRestarts(constant(other), other, every=3, warmup=2, anneal=1)
    resumed.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_a_restart_merges_the_update_restarts_lora_and_prunes_its_optimizer_state(
    tiny_project,
):
    from sft.plugins.relora.restarts import ReloraCallback, lora_layers

    config = tiny_project(*RELORA)
    model = _loaded(config)
    torch.manual_seed(0)
    layers = lora_layers(model)
    for layer in layers.values():  # a trained adapter: B is no longer zero
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    ids = torch.arange(3, 19).reshape(2, 8)
    model(input_ids=ids).logits.sum().backward()
    optimizer.step()
    base_before = q_proj.get_base_layer().weight.detach().clone()
    delta = q_proj.get_delta_weight("default").detach().clone()
    a_before = q_proj.lora_A["default"].weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits

    callback = ReloraCallback(config)
    callback.on_step_begin(None, SimpleNamespace(global_step=2), None, model, optimizer)
    assert callback.restarts == 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # same function
    torch.testing.assert_close(q_proj.get_base_layer().weight, base_before + delta)
    assert torch.count_nonzero(q_proj.lora_B["default"].weight) == 0
    assert not torch.equal(q_proj.lora_A["default"].weight, a_before)  # drawn again
    moments = optimizer.state[q_proj.lora_A["default"].weight]
    for name in ("exp_avg", "exp_avg_sq"):
        zeroed = (moments[name] == 0).float().mean().item()
        assert 0.88 <= zeroed <= 0.92, name  # relora_prune_ratio's default 0.9, by magnitude
    # the same step again (e.g. a callback called twice) does not merge twice
    callback.on_step_begin(None, SimpleNamespace(global_step=2), None, model, optimizer)
    assert callback.restarts == 1


def test_8bit_optimizer_state_is_pruned_through_its_block_scales(tiny_project):
    bnb = pytest.importorskip("bitsandbytes")
    from sft.plugins.relora.restarts import prune_optimizer_state

    weight = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = bnb.optim.AdamW8bit([weight], lr=0.01)
    weight.grad = torch.randn(64, 128)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8
    assert prune_optimizer_state(optimizer, [weight], "magnitude", 0.9) == 2
    from bitsandbytes.functional import dequantize_blockwise

    for index in ("1", "2"):
        values = dequantize_blockwise(
            state[f"state{index}"],
            absmax=state[f"absmax{index}"],
            code=state[f"qmap{index}"],
            blocksize=256,
        )
        # zeroed: the 8-bit map's smallest code (its "zero"), a millionth of a block's largest
        zeroed = values.abs() <= 1e-4 * values.abs().max()
        assert 0.85 <= zeroed.float().mean().item() <= 0.95, index


def test_relora_trains_restarts_and_saves_the_merged_full_model(tiny_project):
    from transformers import AutoModelForCausalLM

    result = train(tiny_project(*RELORA, *SHORT, "max_steps=5"))
    out = result.output_dir
    assert result.saved.startswith("model (ReLoRA: 2 restarts")
    assert not (out / "adapter_config.json").exists()
    saved = load_file(out / "model.safetensors")
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")
    assert sorted(saved) == sorted(base)  # a plain full model
    moved = [k for k in base if not torch.equal(saved[k], base[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)  # the LoRA targets only
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    restarts = [r["num_lora_restarts"] for r in logs if "num_lora_restarts" in r]
    assert restarts == [0, 0, 1, 1, 2]  # merged at the start of steps 3 and 5
    AutoModelForCausalLM.from_pretrained(out)  # loads as it is
    card = (out / "README.md").read_text()
    assert "full model: the base with the lora updates merged" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "Peft" not in card


@pytest.mark.parametrize("flags", [RELORA, QLORA], ids=["lora", "qlora-4bit"])
def test_a_resumed_relora_run_ends_with_the_uninterrupted_runs_model(tiny_project, flags):
    tmp = tiny_project.tmp_path
    keys = (*flags, *SHORT, "max_steps=5", "save_steps=3")
    whole = train(tiny_project(*keys, f"output_dir={tmp}/whole"))
    checkpoint = whole.output_dir / "checkpoint-3"
    state = json.loads((checkpoint / "relora" / "state.json").read_text())
    assert state == {"restarts": 1}  # the restart at the start of step 3 happened before
    (tmp / "again").mkdir()
    shutil.copytree(checkpoint, tmp / "again" / "checkpoint-3")
    again = train(
        tiny_project(*keys, f"output_dir={tmp}/again", "auto_resume_from_checkpoints=true")
    )
    assert again.resumed_from is not None
    want, got = (
        load_file(whole.output_dir / "model.safetensors"),
        load_file(again.output_dir / "model.safetensors"),
    )
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    shutil.rmtree(tmp / "again")
    (tmp / "again").mkdir()
    shutil.copytree(checkpoint, tmp / "again" / "checkpoint-3")
    shutil.rmtree(tmp / "again" / "checkpoint-3" / "relora")
    from sft.errors import ModelError

    with pytest.raises(ModelError, match="holds no ReLoRA state"):
        train(tiny_project(*keys, f"output_dir={tmp}/again", "auto_resume_from_checkpoints=true"))


def test_a_4bit_base_is_rounded_again_from_its_original_plus_the_merged_updates(tiny_project):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    from sft.plugins.relora.restarts import ReloraCallback, lora_layers

    config = tiny_project(*QLORA)
    model = _loaded(config)
    torch.manual_seed(0)
    layers = lora_layers(model)
    layer = layers["model.layers.0.mlp.down_proj"]
    weight = layer.get_base_layer().weight
    original = F.dequantize_4bit(weight.data, weight.quant_state)
    callback = ReloraCallback(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    total = torch.zeros_like(original)
    for restart in (1, 2):
        for each in layers.values():
            torch.nn.init.normal_(each.lora_B["default"].weight, std=1e-3)  # small updates
        total += layer.get_delta_weight("default").detach()
        callback.on_step_begin(
            None, SimpleNamespace(global_step=2 * restart), None, model, optimizer
        )
        weight = layer.get_base_layer().weight
        packed, state = F.quantize_4bit(
            original + total,
            blocksize=weight.quant_state.blocksize,
            quant_type=weight.quant_type,
            compress_statistics=weight.compress_statistics,
        )
        torch.testing.assert_close(
            F.dequantize_4bit(weight.data, weight.quant_state), F.dequantize_4bit(packed, state)
        )
    torch.testing.assert_close(callback.merged["model.layers.0.mlp.down_proj"], total)


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (["adapter=lora", "relora=true"], "relora", "needs jagged_restart_steps"),
        (["relora=true", "jagged_restart_steps=5"], "relora", "merges a LoRA adapter"),
        ([*RELORA, "optimizer=sgd"], "optimizer", "ReLoRA prunes AdamW's optimizer state"),
        ([*RELORA, "peft_use_dora=true"], "peft_use_dora", "cannot be used with relora"),
        (
            [*RELORA, "val_set_size=0.2", "load_best_model_at_end=true"],
            "load_best_model_at_end",
            "cannot be used with relora",
        ),
        (
            ["jagged_restart_steps=5", "jagged_restart_anneal_steps=-1"],
            "jagged_restart_anneal_steps",
            "expected an integer ≥ 0",
        ),
        (
            ["jagged_restart_steps=5", "lr_scheduler=reduce_lr_on_plateau", "val_set_size=0.2"],
            "jagged_restart_steps",
            "sets the learning rate from evaluation results",
        ),
    ],
)
def test_relora_mistakes_are_named(tiny_project, overrides, path, message):
    with pytest.raises(ConfigError) as error:
        tiny_project(*overrides)
    problems = {p.path: p.message for p in error.value.problems}
    assert message in problems[path], problems


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (["relora_prune_ratio=0.5"], "relora_prune_ratio"),
        (["jagged_restart_warmup_steps=3"], "jagged_restart_warmup_steps"),
        ([*RELORA, "relora_cpu_offload=true"], "relora_cpu_offload"),
    ],
)
def test_relora_keys_without_effect_are_warnings(tiny_project, overrides, path):
    config = tiny_project(*overrides)
    (warning,) = [w for w in config.warnings if w.path == path]
    assert "has no effect" in warning.message


def test_axolotls_false_anneal_steps_read_as_none(tiny_project):
    """Axolotl's ReLoRA example sets `jagged_restart_anneal_steps: false` (its `or 1`)."""
    from sft.plugins.relora import keys_of

    config = tiny_project(*RELORA, "jagged_restart_anneal_steps=false")
    assert keys_of(config).jagged_restart_anneal_steps is False
    assert config.warnings == () or all("anneal" not in w.path for w in config.warnings)


def test_a_4bit_runs_final_model_keeps_every_trained_weight(tiny_project):
    """The final model of a QLoRA ReLoRA run: 4-bit layers from the base checkpoint's full-
    precision weights + the merged updates + the last adapter's (untargeted ones exactly as in
    the checkpoint); a float LoRA target (lm_head) with all its merged updates; a
    lora_modules_to_save copy as trained; no quantization left in its config."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from sft.plugins.relora.restarts import ReloraCallback, lora_layers
    from sft.tokenizer import load_tokenizer

    config = tiny_project(
        "adapter=qlora",
        "load_in_4bit=true",
        "relora=true",
        "jagged_restart_steps=2",
        'lora_target_modules=["q_proj", "lm_head"]',
        'lora_modules_to_save=["embed_tokens"]',
    )
    model = _loaded(config)
    layers = lora_layers(model)
    q_proj, head = layers["model.layers.0.self_attn.q_proj"], layers["lm_head"]
    callback = ReloraCallback(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(0)
    totals = {"q": 0, "head": 0}
    for restart in (1, 2, 3):  # two restarts, then the last adapter
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
        totals["q"] = totals["q"] + q_proj.get_delta_weight("default").detach()
        totals["head"] = totals["head"] + head.get_delta_weight("default").detach()
        if restart < 3:
            callback.on_step_begin(
                None, SimpleNamespace(global_step=2 * restart), None, model, optimizer
            )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(1.0)  # the trained copy of the embeddings

    out = tiny_project.tmp_path / "final"
    out.mkdir()
    saved_as = callback.save_merged(model, load_tokenizer(config), str(out))
    assert saved_as.startswith("model (ReLoRA: 2 restarts")
    saved = load_file(out / "model.safetensors")
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")
    assert sorted(saved) == sorted(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(saved[q], base[q] + totals["q"])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(saved[k], base[k])  # 4-bit, not targeted: the checkpoint's own weights
    torch.testing.assert_close(saved["lm_head.weight"], base["lm_head.weight"] + totals["head"])
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(saved[embed], base[embed] + 1.0)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(out)


def test_magnitude_pruning_takes_tensors_beyond_torch_quantiles_limit():
    from sft.plugins.relora.restarts import prune_optimizer_state

    weight = torch.nn.Parameter(torch.zeros(2**24 + 64))  # quantile() refuses > 2**24 values
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    assert prune_optimizer_state(optimizer, [weight], "magnitude", 0.9) == 2
    zeroed = (optimizer.state[weight]["exp_avg"] == 0).float().mean().item()
    assert zeroed == pytest.approx(0.9, abs=1e-3)


def test_the_jagged_floor_and_warmup_read_axolotls_way(tiny_project):
    from sft.plugins.relora import _floor

    assert _floor(tiny_project("lr_scheduler=cosine", "cosine_min_lr_ratio=0.1")) == 0.1
    assert _floor(tiny_project("lr_scheduler=linear")) == 0.001
    # `jagged_restart_warmup_steps: 0` is Axolotl's `or 10`: a ten-step ramp
    result = train(
        tiny_project(
            "jagged_restart_steps=3",
            "jagged_restart_warmup_steps=0",
            "max_steps=5",
            "lr_scheduler=constant",
            "logging_steps=1",
            "learning_rate=0.01",
        )
    )
    logs = [
        json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    lrs = [r["learning_rate"] for r in logs if "learning_rate" in r]
    # the rate each step trained with: ramping over ten steps from the restart at step 3
    assert lrs[2] == pytest.approx(0.01 * (0.2 * 0.999 + 0.001))  # Axolotl's first cycle
    assert lrs[3] == pytest.approx(0.01 * 0.001)
    assert lrs[4] == pytest.approx(0.01 * (0.1 * 0.999 + 0.001))
