"""The qat plugin: torchao fake quantization while training, plain float layers when saved."""

from __future__ import annotations

import pytest
import torch

from sft.errors import ConfigError

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'sft-train[qat]')")

QAT = "qat={weight_dtype = 'int4', activation_dtype = 'int8', group_size = 32}"


def _loaded(config):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    return load_model(config, load_tokenizer(config), get_plugins())


def _fake_quantized(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Symmetric per-group integer rounding of `weight`, written out by hand."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // group_size, group_size)
    top = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6) / ((2 * top + 1) / 2)
    rounded = torch.clamp(torch.round(groups / scale), -top - 1, top) * scale
    return rounded.reshape(rows, columns)


def test_qat_fake_quantizes_the_linear_layers_but_not_the_head(tiny_project):
    model = _loaded(tiny_project("qat={weight_dtype = 'int4', group_size = 32}"))
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "FakeQuantizedLinear"
    assert type(model.lm_head).__name__ == "Linear"
    assert type(model.model.embed_tokens).__name__ == "Embedding"
    weight = layer.weight.detach()
    rounded = layer.weight_fake_quantizer(weight)
    by_hand = _fake_quantized(weight, 32, 4)
    # the same rounding; a weight exactly on a rounding boundary may land one step apart
    assert torch.isclose(rounded, by_hand, atol=1e-5).float().mean() > 0.99
    assert (rounded - by_hand).abs().max() <= by_hand.abs().max() / 7 + 1e-6  # one int4 step
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ rounded.T)  # the layer computes with them
    assert (layer(x) - x @ weight.T).abs().max() > 1e-3  # not the float layer


def test_qat_trains_and_saves_a_plain_float_model(tiny_project):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft.train.run import train

    config = tiny_project(QAT, "max_steps=2", "learning_rate=0.001", "qat.quantize_embedding=true")
    result = train(config)
    assert result.global_step == 2
    saved = load_file(result.output_dir / "model.safetensors")
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")
    assert set(saved) == set(base)  # plain layers: no fake-quantizer state
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_fake_quant_after_n_steps_trains_in_full_precision_first(tiny_project):
    from sft.plugins.qat import set_fake_quant

    model = _loaded(tiny_project(QAT, "qat.fake_quant_after_n_steps=1"))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # off until the step comes
    assert set_fake_quant(model, enabled=True) > 0
    assert (layer(x) - x @ layer.weight.T).abs().max() > 1e-3

    from sft.train.run import train

    steps = []
    original = set_fake_quant

    def recording(model, enabled):
        steps.append(enabled)
        return original(model, enabled)

    import sft.plugins.qat

    sft.plugins.qat.set_fake_quant = recording
    try:
        train(tiny_project(QAT, "qat.fake_quant_after_n_steps=1", "max_steps=3"))
    finally:
        sft.plugins.qat.set_fake_quant = original
    assert steps[-3:] == [False, True, True]  # step 0 in full precision, then fake-quantized


@pytest.mark.parametrize(
    ("dtypes", "layer_type"),
    [
        ("weight_dtype = 'mxfp4', activation_dtype = 'mxfp4', group_size = 32", "MXFakeQuantized"),
        ("weight_dtype = 'fp8', activation_dtype = 'float8_e4m3fn'", "FakeQuantized"),
        ("weight_dtype = 'int4', activation_dtype = 'float8', group_size = 32", "FakeQuantized"),
    ],
)
def test_floating_point_qat_rounds_like_torchao_and_trains(tiny_project, dtypes, layer_type):
    """Axolotl's float8 and mxfp4 QAT: the layers compute what torchao's own fake-quantized
    layers compute, differ from the float layer, and a run saves plain float layers."""
    import copy

    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from sft.plugins.qat import _fake_quantize_configs, settings_of
    from sft.train.run import train

    config = tiny_project(f"qat={{{dtypes}}}", "max_steps=2", "learning_rate=0.001")
    model = _loaded(config)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == f"{layer_type}Linear"
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    plain.weight = torch.nn.Parameter(layer.weight.detach().clone())
    reference = torch.nn.Sequential(copy.deepcopy(plain))
    activations, weights = _fake_quantize_configs(settings_of(config))
    quantize_(reference, QATConfig(activation_config=activations, weight_config=weights))
    x = torch.randn(2, 5, layer.in_features)
    torch.testing.assert_close(layer(x), reference[0](x))
    assert (layer(x) - plain(x)).abs().max() > 1e-3

    result = train(config)
    assert result.global_step == 2
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == "Linear"


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (
            ["qat={weight_dtype = 'int4'}", "adapter=lora"],
            "qat",
            "cannot be combined with an adapter",
        ),
        (["qat={activation_dtype = 'int8'}"], "qat.weight_dtype", "is required"),
        (
            ["qat={weight_dtype = 'nvfp4', group_size = 32}"],
            "qat.group_size",
            "nvfp4 scales blocks of 16 values, found 32",
        ),
        (
            ["qat={weight_dtype = 'nvfp4', activation_dtype = 'int8'}"],
            "qat.activation_dtype",
            "nvfp4 weights go with nvfp4 activations or none, found 'int8'",
        ),
        (
            ["qat={weight_dtype = 'int4', activation_dtype = 'nvfp4'}"],
            "qat.weight_dtype",
            "nvfp4 activations need nvfp4 weights",
        ),
        (
            ["qat={weight_dtype = 'nvfp4', activation_dtype = 'nvfp4'}", "fp16=true"],
            "fp16",
            "torchao's NVFP4 rounding takes bfloat16 or float32 values only",
        ),
        (
            ["qat={weight_dtype = 'nvfp4', quantize_embedding = true}"],
            "qat.quantize_embedding",
            "cannot be used with nvfp4",
        ),
        (
            ["qat={weight_dtype = 'ternary', activation_dtype = 'int4'}"],
            "qat.activation_dtype",
            "ternary weights go with int8 activations or none, found 'int4'",
        ),
        (
            ["qat={weight_dtype = 'int4', activation_dtype = 'ternary'}"],
            "qat.activation_dtype",
            "ternary is a weight type",
        ),
        (["qat={weight_dtype = 'int16'}"], "qat.weight_dtype", "'int16' is not supported by sft"),
        (
            ["qat={weight_dtype = 'mxfp4', activation_dtype = 'int8'}"],
            "qat.activation_dtype",
            "mxfp4 rounds weights and activations together",
        ),
        (
            ["qat={weight_dtype = 'mxfp4', activation_dtype = 'mxfp4', group_size = 16}"],
            "qat.group_size",
            "mxfp4 scales blocks of 32 values, found 16",
        ),
        (
            [
                "qat={weight_dtype = 'mxfp4', activation_dtype = 'mxfp4', fake_quant_after_n_steps=2}"
            ],
            "qat.fake_quant_after_n_steps",
            "cannot be used with mxfp4",
        ),
        (
            ["qat={weight_dtype = 'int4', grop_size = 32}"],
            "qat.grop_size",
            "did you mean 'group_size'",
        ),
        (
            ["qat={weight_dtype = 'int4', group_size = 0}"],
            "qat.group_size",
            "expected an integer ≥ 1",
        ),
    ],
)
def test_qat_mistakes_are_named(tiny_project, overrides, path, message):
    with pytest.raises(ConfigError) as error:
        tiny_project(*overrides)
    problems = {p.path: p.message for p in error.value.problems}
    assert message in problems[path]


def test_a_group_size_for_float8_weights_is_a_warning(tiny_project):
    config = tiny_project("qat={weight_dtype = 'fp8', group_size = 32}")
    (warning,) = [w for w in config.warnings if w.path == "qat.group_size"]
    assert "no effect with float8 weights" in warning.message


def test_mxfp4_weights_alone_round_the_activations_too(tiny_project):
    """Axolotl's reading of `weight_dtype: mxfp4` with no activation_dtype."""
    model = _loaded(tiny_project("qat={weight_dtype = 'mxfp4'}"))
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "MXFakeQuantizedLinear"
    assert layer.activation_config == layer.weight_config


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("qwen2", "has a bias, which torchao's MX layers do not train"),
        ("llama-80", "not a multiple"),
    ],
)
def test_mxfp4_refuses_layers_torchao_cannot_train(tmp_path, plugins, arch, message):
    from sft.config import load_config_text
    from sft.errors import ModelError
    from sft.plugins.chat_template.templates import builtin_template
    from sft.testing import build_model, build_tokenizer

    tokenizer = build_tokenizer(chat_template=builtin_template("chatml"))
    if arch == "llama-80":
        model = build_model(tokenizer, "llama", intermediate_size=80)
    else:
        model = build_model(tokenizer, arch)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = load_config_text(
        f'base_model = "{tmp_path / "m"}"\nqat = {{weight_dtype = "mxfp4"}}\n'
        '[[datasets]]\npath = "x.jsonl"\n',
        plugins=plugins,
        machine_checks=False,
    )
    with pytest.raises(ModelError, match=message):
        _loaded(config)


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _on_the_nvfp4_grid(rounded: torch.Tensor) -> bool:
    """Each block of 16 is FP4 values (E2M1: 0, ±0.5 … ±6) times one scale; the block's largest
    magnitude is 6 × the scale."""
    blocks = rounded.reshape(-1, 16)
    top = blocks.abs().amax(dim=-1, keepdim=True)
    scaled = (blocks.abs() / torch.where(top > 0, top / 6, 1)).reshape(-1, 1)
    return bool(((scaled - FP4_GRID).abs().amin(dim=-1) < 1e-3).all())


@pytest.mark.parametrize("activations", [True, False])
def test_nvfp4_qat_rounds_weights_and_activations_in_blocks_of_16(tiny_project, activations):
    """Axolotl's `qat: {weight_dtype: nvfp4, activation_dtype: nvfp4, group_size: 16}`: the
    layers compute with NVFP4-rounded weights (and inputs), on this CPU, and gradients pass
    straight through the rounding."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    table = "weight_dtype = 'nvfp4', group_size = 16"
    if activations:
        table += ", activation_dtype = 'nvfp4'"
    model = _loaded(tiny_project(f"qat={{{table}}}"))
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "RoundingLinear"
    assert type(model.lm_head).__name__ == "Linear"

    def rounded(values: torch.Tensor) -> torch.Tensor:
        rows = values.reshape(-1, values.shape[-1])
        scale = per_tensor_amax_to_scale(rows.abs().max())
        return NVFP4Tensor.to_nvfp4(rows, per_tensor_scale=scale).dequantize(values.dtype)

    weight = layer.weight.detach()
    assert _on_the_nvfp4_grid(layer.weight_fake_quantizer(weight))
    assert not _on_the_nvfp4_grid(weight)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    x_used = rounded(x).reshape(x.shape) if activations else x
    expected = x_used @ rounded(weight).T
    torch.testing.assert_close(layer(x), expected)
    assert (layer(x) - x @ weight.T).abs().max() > 1e-3
    if activations:
        assert _on_the_nvfp4_grid(layer.activation_fake_quantizer(x))
    else:
        assert layer.activation_fake_quantizer is None

    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    grad_out = 2 * expected
    torch.testing.assert_close(
        layer.weight.grad,
        grad_out.reshape(-1, grad_out.shape[-1]).T @ x_used.reshape(-1, x.shape[-1]),
    )
    torch.testing.assert_close(x.grad, grad_out @ rounded(weight))


def test_nvfp4_qat_trains_switches_on_late_and_saves_plain_layers(tiny_project):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft.plugins.qat import set_fake_quant
    from sft.train.run import train

    table = "qat={weight_dtype = 'nvfp4', activation_dtype = 'nvfp4', fake_quant_after_n_steps = 1}"
    config = tiny_project(table, "max_steps=2", "learning_rate=0.001")
    model = _loaded(config)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # off until the step comes
    assert set_fake_quant(model, enabled=True) == 2 * sum(
        type(m).__name__ == "RoundingLinear" for m in model.modules()
    )
    assert (layer(x) - x @ layer.weight.T).abs().max() > 1e-3

    result = train(config)
    assert result.global_step == 2
    saved = load_file(result.output_dir / "model.safetensors")
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")
    assert set(saved) == set(base)
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_nvfp4_refuses_a_layer_not_in_whole_blocks(tmp_path, plugins):
    from sft.config import load_config_text
    from sft.errors import ModelError
    from sft.plugins.chat_template.templates import builtin_template
    from sft.testing import build_model, build_tokenizer

    tokenizer = build_tokenizer(chat_template=builtin_template("chatml"))
    build_model(tokenizer, "llama", intermediate_size=72).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = load_config_text(
        f'base_model = "{tmp_path / "m"}"\nqat = {{weight_dtype = "nvfp4"}}\n'
        '[[datasets]]\npath = "x.jsonl"\n',
        plugins=plugins,
        machine_checks=False,
    )
    with pytest.raises(
        ModelError, match=r"down_proj takes 72 inputs, not a multiple of the 16-value block"
    ):
        _loaded(config)


def _ternary(weight: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} × the row's mean magnitude, written out by hand."""
    scale = weight.abs().mean(dim=-1, keepdim=True)
    return torch.clamp(torch.round(weight / scale), -1, 1) * scale


def test_ternary_qat_rounds_like_bitnet_and_saves_the_ternary_weights(tiny_project):
    """Axolotl's `qat: {weight_dtype: ternary, activation_dtype: int8, quantize_embedding: true}`:
    ternary weights per row, int8 activations per token, int8 embedding rows; the saved linear
    layers hold the ternary values (three per row, up to sign), the head stays float."""
    from safetensors.torch import load_file

    from sft.train.run import train

    table = "qat={weight_dtype = 'ternary', activation_dtype = 'int8', quantize_embedding = true}"
    config = tiny_project(table, "max_steps=2", "learning_rate=0.001")
    model = _loaded(config)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "RoundingLinear"
    assert type(model.model.embed_tokens).__name__ == "FakeQuantizedEmbedding"
    assert type(model.lm_head).__name__ == "Linear"
    weight = layer.weight.detach()
    torch.testing.assert_close(layer.weight_fake_quantizer(weight), _ternary(weight))
    x = torch.randn(3, 4, layer.in_features, generator=torch.Generator().manual_seed(0))
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    x_int8 = torch.round(x / step) * step
    torch.testing.assert_close(layer(x), x_int8 @ _ternary(weight).T)
    assert (layer(x) - x @ weight.T).abs().max() > 1e-3

    result = train(config)
    assert result.global_step == 2
    saved = load_file(result.output_dir / "model.safetensors")
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")
    assert set(saved) == set(base)
    down = saved["model.layers.0.mlp.down_proj.weight"]
    assert all(len(row.abs().unique()) == 2 for row in down)  # baked: 0 and the row's scale
    assert all(len(row.abs().unique()) > 2 for row in saved["lm_head.weight"])  # float head


def test_ternary_weights_alone_leave_the_activations_float(tiny_project):
    model = _loaded(tiny_project("qat={weight_dtype = 'ternary'}"))
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.activation_fake_quantizer is None
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(x), x @ _ternary(layer.weight.detach()).T)


def test_nvfp4_rounds_an_all_zero_tensor_to_zeros():
    from sft.plugins.qat.rounding import round_to_nvfp4

    for dtype in (torch.float32, torch.bfloat16):
        zeros = torch.zeros(4, 32, dtype=dtype)
        assert torch.equal(round_to_nvfp4(zeros), zeros)
