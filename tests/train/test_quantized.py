"""bitsandbytes 4/8-bit loading (QLoRA) on CPU, and quantize_moe_experts on a tiny fused MoE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sft.errors import ConfigError, ModelError
from sft.train.run import train


def _loaded(config):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    return load_model(config, load_tokenizer(config), get_plugins())


@pytest.mark.parametrize(
    ("flags", "layer_class"),
    [
        (["adapter=qlora", "load_in_4bit=true"], "Linear4bit"),
        (["adapter=lora", "load_in_8bit=true"], "Linear8bitLt"),
    ],
)
def test_quantized_lora_trains_on_cpu(tiny_project, flags, layer_class):
    config = tiny_project("max_steps=2", *flags)
    model = _loaded(config)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    result = train(config)
    assert result.global_step == 2 and result.train_loss == pytest.approx(result.train_loss)
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    assert any("q_proj.lora_A" in name for name in saved)


def test_an_old_bitsandbytes_without_a_gpu_is_a_clear_error(tiny_project, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: every bitsandbytes quantizes there")
    import sft.hardware

    monkeypatch.setattr(sft.hardware, "package_version", lambda name: "0.45.5")
    with pytest.raises(ConfigError) as error:
        tiny_project("adapter=qlora", "load_in_4bit=true")
    assert "bitsandbytes (0.45.5) quantizes on CUDA only" in str(error.value)
    assert "bitsandbytes>=0.48" in str(error.value)


@pytest.mark.parametrize(("bits", "stored"), [(4, torch.uint8), (8, torch.int8)])
def test_quantize_moe_experts_quantizes_the_fused_expert_weights(
    tiny_project, tiny_moe, bits, stored
):
    flags = (
        ["adapter=qlora", "load_in_4bit=true"]
        if bits == 4
        else ["adapter=lora", "load_in_8bit=true"]
    )
    plain = _loaded(tiny_project(f"base_model={tiny_moe}", *flags))
    quantized = _loaded(tiny_project(f"base_model={tiny_moe}", *flags, "quantize_moe_experts=true"))
    experts = quantized.model.layers[0].mlp.experts
    assert set(experts.parametrizations) == {"gate_up_proj", "down_proj"}
    assert experts.parametrizations.gate_up_proj.original.dtype == stored
    stored_bytes = experts.parametrizations.gate_up_proj.original.numel()
    original = plain.model.layers[0].mlp.experts.gate_up_proj
    assert stored_bytes == original.numel() // (2 if bits == 4 else 1)  # 4 or 8 bits a weight
    # the dequantized weight the experts compute with is the original, up to quantization error
    error = (experts.gate_up_proj - original).abs().max() / original.abs().max()
    assert 0 < error < (0.2 if bits == 4 else 0.02)


def test_lora_on_quantized_experts_trains_and_saves_them(tiny_project, tiny_moe):
    config = tiny_project(
        f"base_model={tiny_moe}",
        "adapter=qlora",
        "load_in_4bit=true",
        "quantize_moe_experts=true",
        "lora_target_modules=[q_proj]",
        "lora_target_parameters=['mlp.experts.gate_up_proj', 'experts.down_proj']",
        "max_steps=3",  # more than one forward: peft must remove its proxy after each
    )
    result = train(config)
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.train_loss))
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    expert_lora = sorted(name for name in saved if "experts" in name)
    assert len(expert_lora) == 4, expert_lora  # lora_A and lora_B of gate_up_proj and down_proj
    assert all(saved[name].abs().sum() > 0 for name in expert_lora), {
        n: saved[n].abs().sum() for n in expert_lora
    }


def test_quantize_moe_experts_needs_quantized_loading_and_an_adapter(tiny_project):
    with pytest.raises(ConfigError, match="neither is set"):
        tiny_project("adapter=lora", "quantize_moe_experts=true")
    with pytest.raises(ConfigError, match="it needs an adapter"):
        tiny_project("load_in_8bit=true", "quantize_moe_experts=true")


def test_quantize_moe_experts_on_a_dense_model_is_a_clear_error(tiny_project):
    config = tiny_project("adapter=qlora", "load_in_4bit=true", "quantize_moe_experts=true")
    with pytest.raises(ModelError, match="keeps no MoE expert weights"):
        _loaded(config)


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_target_parameters_naming_nothing_is_an_error(tiny_project, tiny_moe, quantized):
    from sft.model import apply_adapter

    flags = ["load_in_4bit=true", "quantize_moe_experts=true"] if quantized else []
    config = tiny_project(
        f"base_model={tiny_moe}",
        "adapter=qlora" if quantized else "adapter=lora",
        *flags,
        "lora_target_parameters=['mlp.experts.w1']",
    )
    with pytest.raises(ModelError, match=r"names no parameter of this model"):
        apply_adapter(_loaded(config), config)


def test_lora_on_quantized_experts_equals_lora_on_their_dequantized_weights(tiny_moe):
    """Both targeted expert weights get their LoRA delta in the forward and a gradient in the
    backward, on every step (peft's proxy handling on stacked parametrizations)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.experts import full_target_parameters, quantize_expert_weights

    targets = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    quantized = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    quantize_expert_weights(quantized, bits=4, quant_type="nf4", double_quant=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    experts = reference.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        dequantized = getattr(quantized.model.layers[0].mlp.experts, name).detach().clone()
        setattr(experts, name, torch.nn.Parameter(dequantized))
    lora = {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": False}
    quantized = get_peft_model(
        quantized, LoraConfig(target_parameters=full_target_parameters(quantized, targets), **lora)
    )
    reference = get_peft_model(reference, LoraConfig(target_parameters=list(targets), **lora))
    wrappers = [
        {m.parameter_name: m for m in model.modules() if type(m).__name__ == "ParamWrapper"}
        for model in (quantized, reference)
    ]
    assert wrappers[0].keys() == wrappers[1].keys() == {"gate_up_proj", "down_proj"}
    with torch.no_grad():
        for name, source in wrappers[0].items():
            for factor in ("lora_A", "lora_B"):
                getattr(wrappers[1][name], factor).default.weight.copy_(
                    getattr(source, factor).default.weight
                )
        attention = {n: p for n, p in quantized.named_parameters() if "q_proj.lora" in n}
        for n, p in reference.named_parameters():
            if n in attention:
                p.copy_(attention[n])
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(2):
        losses = [m(input_ids=ids, labels=ids).loss for m in (quantized, reference)]
        torch.testing.assert_close(losses[0], losses[1])
        for loss in losses:
            loss.backward()
        for name, wrapper in wrappers[0].items():
            for factor in ("lora_A", "lora_B"):
                grad = getattr(wrapper, factor).default.weight.grad
                expected = getattr(wrappers[1][name], factor).default.weight.grad
                assert grad is not None and grad.abs().sum() > 0, (name, factor)
                torch.testing.assert_close(grad, expected)
        for m in (quantized, reference):
            m.zero_grad()


def test_bnb_keys_and_bnb_config_kwargs_reach_the_quantization_config(tiny_project):
    from sft.model import bitsandbytes_config

    config = tiny_project(
        "adapter=qlora",
        "load_in_4bit=true",
        "bnb_4bit_quant_type=fp4",
        "bnb_4bit_use_double_quant=false",
        "bnb_4bit_compute_dtype=bfloat16",
        "bnb_config_kwargs={llm_int8_skip_modules = ['lm_head', 'q_proj']}",
    )
    bnb = bitsandbytes_config(config, torch.float32)
    assert (bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == ("fp4", False)
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    model = _loaded(config)
    layer = model.model.layers[0].self_attn
    assert type(layer.q_proj).__name__ == "Linear"  # skipped, as bnb_config_kwargs says
    assert type(layer.k_proj).__name__ == "Linear4bit"
    assert layer.k_proj.weight.quant_state.quant_type == "fp4"


def test_bnb_config_kwargs_naming_no_argument_is_a_clear_error(tiny_project):
    config = tiny_project(
        "adapter=qlora", "load_in_4bit=true", "bnb_config_kwargs={bnb_4bit_typo = 1}"
    )
    with pytest.raises(ModelError, match="bnb_config_kwargs: bnb_4bit_typo is not an argument"):
        _loaded(config)


def test_bnb_keys_without_quantized_loading_are_warnings(tiny_project):
    config = tiny_project("bnb_4bit_quant_type=fp4")
    (warning,) = config.warnings
    assert warning.path == "bnb_4bit_quant_type" and "load_in_4bit is not set" in warning.message


def test_model_quantization_config_loads_gpt_oss_mxfp4_dequantized_and_trains(tiny_project):
    """gpt-oss as Axolotl's examples load it: Mxfp4Config(dequantize=True); a full
    fine-tune step, and the saved model loads back in plain transformers."""
    from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

    from sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_project())
    path = tiny_project.tmp_path / "gpt-oss"
    GptOssForCausalLM(
        GptOssConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = tiny_project(
        f"base_model={path}",
        "model_quantization_config=Mxfp4Config",
        "model_quantization_config_kwargs={dequantize = true}",
        "attn_implementation=eager",  # gpt-oss has no sdpa path in transformers
        "max_steps=1",
        "learning_rate=0.001",
    )
    result = train(config)
    assert result.global_step == 1
    trained = AutoModelForCausalLM.from_pretrained(result.output_dir)
    base = AutoModelForCausalLM.from_pretrained(path)
    moved = [
        (trained.state_dict()[name] - weight).abs().max().item()
        for name, weight in base.state_dict().items()
    ]
    assert max(moved) > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model_quantization_config=AutoConfig"], "is not a quantization config class"),
        (["model_quantization_config=BitsAndBytesConfig"], "set load_in_4bit or load_in_8bit"),
        (
            [
                "model_quantization_config=Mxfp4Config",
                "model_quantization_config_kwargs={dequantise = true}",
            ],
            "Mxfp4Config takes no argument dequantise",
        ),
        (["model_quantization_config=HqqConfig"], "A valid HQQ version"),  # hqq not installed
    ],
)
def test_model_quantization_config_mistakes_are_clear_errors(tiny_project, overrides, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        _loaded(tiny_project(*overrides))


def test_model_quantization_config_conflicts_with_load_in_4bit(tiny_project):
    with pytest.raises(ConfigError, match="conflicts with load_in_4bit"):
        tiny_project("adapter=qlora", "load_in_4bit=true", "model_quantization_config=Mxfp4Config")


def test_4bit_weights_whose_rows_split_a_block_dequantize_to_the_original_on_cpu():
    # bitsandbytes' AVX-512 CPU kernel dequantizes per row: with rows of 96 values and blocks
    # of 64, every row after the first came back with the wrong scales (error ~0.5).
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from sft.bnb_cpu import fix_cpu_dequantize_if_needed, splits_blocks

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(
        torch.randn(10, 96, generator=torch.Generator().manual_seed(0))
    )
    original = module.weight.detach().clone()
    replace_parameter_4bit(module, "weight", quant_type="nf4", blocksize=64)
    assert splits_blocks(module.parametrizations.weight[0].quant_state.shape, 64)
    fix_cpu_dequantize_if_needed(module)
    error = (module.weight - original).abs().max() / original.abs().max()
    assert error < 0.15
