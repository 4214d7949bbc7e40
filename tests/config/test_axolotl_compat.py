"""Axolotl's keys with Axolotl's meaning: blank values, model/tokenizer classes, root eot_tokens,
attention values and `plugins:` entries."""

from __future__ import annotations

import json
import textwrap

import pytest

from sft.config import load_config_text
from sft.errors import ConfigError, ModelError
from sft.testing import build_tokenizer

HEAD = "base_model: unused\ndatasets:\n  - path: x.jsonl\n    type: chat_template\n"


def load_yaml(text: str):
    return load_config_text(HEAD + textwrap.dedent(text), "yaml", machine_checks=False)


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as error:
        load_yaml(text)
    return {p.path: p.message for p in error.value.problems}


def warnings_of(config) -> dict[str, str]:
    return {w.path: w.message for w in config.warnings}


# -- blank values -------------------------------------------------------------------------------


def test_a_blank_value_of_any_key_is_its_default(plugins):
    config = load_yaml(
        """
        fp16:
        bf16:
        lora_r:
        lora_alpha:
        lora_target_linear:
        sequence_len:
        optimizer:
        learning_rate:
        wandb_project:
        hub_model_id:
        eot_tokens:
        liger_rms_norm:
        chunked_cross_entropy:
        """
    )
    defaults = load_config_text(HEAD, "yaml", machine_checks=False)
    assert config == defaults
    assert config.optimizer == "adamw_torch" and config.wandb_project is None


def test_an_empty_toml_string_is_blank_too(plugins):
    config = load_config_text(
        'base_model = "unused"\nwandb_project = ""\noptimizer = ""\nlearning_rate = ""\n'
        '[[datasets]]\npath = "x.jsonl"\nsplit = ""\n',
        machine_checks=False,
    )
    defaults = load_config_text(
        'base_model = "unused"\n[[datasets]]\npath = "x.jsonl"\n', machine_checks=False
    )
    assert config == defaults


def test_a_blank_required_key_says_so(plugins):
    with pytest.raises(ConfigError) as error:
        load_config_text(
            "base_model:\ndatasets:\n  - path: x.jsonl\n", "yaml", machine_checks=False
        )
    assert {p.path: p.message for p in error.value.problems} == {"base_model": "is blank"}


# -- model and tokenizer classes -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["AutoModelForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"])
def test_causal_lm_model_types_are_accepted(plugins, name):
    assert load_yaml(f"model_type: {name}\n").model_type == name


def test_a_multimodal_class_is_accepted_for_text_training_with_a_warning(plugins):
    config = load_yaml("model_type: Llama4ForConditionalGeneration\n")
    assert config.model_type == "Llama4ForConditionalGeneration"
    (warning,) = config.warnings
    assert warning.path == "model_type" and "trains here on text only" in warning.message


@pytest.mark.parametrize("name", ["AutoModelForVision2Seq", "MambaLMHeadModel"])
def test_other_model_types_are_refused_as_not_causal_lms(plugins, name):
    message = problems_of(f"model_type: {name}\n")["model_type"]
    assert f"{name!r} is not a causal-LM class" in message


def test_tokenizer_type_must_be_a_tokenizer_and_use_fast_false_is_refused(plugins):
    assert load_yaml("tokenizer_type: LlamaTokenizer\n").tokenizer_type == "LlamaTokenizer"
    problems = problems_of("tokenizer_type: AutoProcessor\ntokenizer_use_fast: false\n")
    assert "'AutoProcessor' is not a tokenizer class" in problems["tokenizer_type"]
    assert "needs the fast (Rust) tokenizer" in problems["tokenizer_use_fast"]


def test_model_and_tokenizer_load_with_the_classes_named(tiny_project):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("model_type=LlamaForCausalLM", "tokenizer_type=PreTrainedTokenizerFast")
    tokenizer = load_tokenizer(config)
    assert type(tokenizer) is PreTrainedTokenizerFast
    assert type(load_model(config, tokenizer, get_plugins())) is LlamaForCausalLM


def test_cls_model_config_names_the_class_that_reads_the_config(tiny_project):
    # the tiny model is a Llama checkpoint; read by MistralConfig, AutoModelForCausalLM builds
    # the Mistral model for it (the weights share their names)
    from transformers import MistralConfig, MistralForCausalLM

    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("cls_model_config=MistralConfig")
    model = load_model(config, load_tokenizer(config), get_plugins())
    assert type(model.config) is MistralConfig and type(model) is MistralForCausalLM
    with pytest.raises(ModelError, match="cls_model_config = 'NoSuchConfig': the installed"):
        bad = tiny_project("cls_model_config=NoSuchConfig")
        load_model(bad, load_tokenizer(bad), get_plugins())
    assert (
        "is not a transformers config class"
        in problems_of("cls_model_config: LlamaForCausalLM\n")["cls_model_config"]
    )


def test_a_class_transformers_lacks_is_a_clear_error(tiny_project):
    from sft.tokenizer import load_tokenizer

    with pytest.raises(ModelError, match="tokenizer_type = 'NoSuchTokenizer': the installed"):
        load_tokenizer(tiny_project("tokenizer_type=NoSuchTokenizer"))


# -- root eot_tokens --------------------------------------------------------------------------------


TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|><|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TURNS = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris."}]


def trained_text(config, tokenizer) -> str:
    return trained_row(config, tokenizer, {"messages": TURNS})


def test_root_eot_tokens_apply_to_chat_template_datasets_without_their_own(plugins):
    special = ["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]
    tokenizer = build_tokenizer(
        chat_template=TEMPLATE, special_tokens=special, eos_token="<|endoftext|>"
    )
    plain = load_yaml("")
    assert trained_text(plain, tokenizer) == "Paris.<|end|><|endoftext|>"
    root = load_yaml('eot_tokens: ["<|end|>"]\n')
    assert trained_text(root, tokenizer) == "Paris.<|end|>"
    own = load_config_text(
        HEAD + '    eot_tokens: ["<|endoftext|>"]\neot_tokens: ["<|end|>"]\n',
        "yaml",
        machine_checks=False,
    )
    assert trained_text(own, tokenizer) == "Paris.<|endoftext|>"
    wrong = load_yaml('eot_tokens: ["<|eot_id|>"]\n')
    with pytest.raises(ConfigError) as error:
        trained_text(wrong, tokenizer)
    assert error.value.problems[0].path == "eot_tokens"


def test_root_eot_tokens_without_a_dataset_using_them_is_a_warning(plugins):
    config = load_config_text(
        'base_model: unused\neot_tokens: ["<|end|>"]\ndatasets:\n  - path: x.jsonl\n'
        "    type: alpaca\n",
        "yaml",
        machine_checks=False,
    )
    assert "has no effect" in warnings_of(config)["eot_tokens"]


# -- attention values -----------------------------------------------------------------------------


def test_xformers_runs_as_sdpa_with_a_note(plugins):
    config = load_yaml("attn_implementation: xformers\n")
    assert config.attention == "sdpa"
    assert "runs as sft's 'sdpa'" in warnings_of(config)["attn_implementation"]


def test_a_hub_flash_attention_kernel_maps_to_the_flash_attn_backend(plugins):
    config = load_config_text(
        HEAD + "attn_implementation: kernels-community/vllm-flash-attn3\n",
        "yaml",
        machine_checks=False,
    )
    assert config.attention == "flash_attention_3"


def test_flash_sparse_attention_is_refused_by_name(plugins):
    message = problems_of("attn_implementation: fsa\n")["attn_implementation"]
    assert "flash sparse attention" in message


# -- plugins: -------------------------------------------------------------------------------------

CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER = "axolotl.integrations.liger.LigerPlugin"


def test_axolotl_liger_and_cce_plugins_map_to_sft_plugins(plugins):
    from sft.plugins.chunked_ce import enabled

    config = load_yaml(f"plugins:\n  - {LIGER}\n  - {CCE}\nliger_rms_norm: true\n")
    assert enabled(config)
    assert "runs as sft's chunked cross-entropy" in warnings_of(config)["cut_cross_entropy"]
    off = load_yaml(f"plugins:\n  - {CCE}\ncut_cross_entropy: false\n")
    assert not enabled(off)
    assert not enabled(load_yaml(f"plugins:\n  - {LIGER}\n"))
    assert enabled(load_yaml("cut_cross_entropy: true\n"))


def test_cce_with_liger_fused_linear_cross_entropy_is_a_conflict(plugins):
    problems = problems_of(f"plugins:\n  - {CCE}\nliger_fused_linear_cross_entropy: true\n")
    assert "conflicts with liger_fused_linear_cross_entropy" in problems["cut_cross_entropy"]


def test_unknown_plugin_entries_say_what_to_do(plugins):
    problems = problems_of(
        "plugins:\n  - axolotl.integrations.kd.KDPlugin\n  - mycompany.plugins.Thing\n"
    )
    assert "no installed sft plugin stands in for" in problems["plugins[0]"]
    assert "sft does not import plugins by path" in problems["plugins[1]"]


def test_a_third_party_plugin_can_stand_in_for_an_axolotl_integration(throwaway_dist):
    from sft.manager import SftPlugins, set_plugins

    throwaway_dist(
        "sft-kd",
        {"kd": "sft_kd"},
        {
            "sft_kd": """
            import attrs
            from sft import hookimpl
            from sft.components import ConfigKeys
            from sft.config.schema import key

            @attrs.frozen
            class KDKeys:
                kd_alpha: float | None = key(None, doc="weight of the distillation loss")

            @hookimpl
            def sft_config_keys():
                return [ConfigKeys(KDKeys, axolotl_integrations=("axolotl.integrations.kd.KDPlugin",))]
            """
        },
    )
    set_plugins(SftPlugins.load(environ={}))
    try:
        config = load_yaml("plugins:\n  - axolotl.integrations.kd.KDPlugin\nkd_alpha: 0.5\n")
        assert config.plugins == ("axolotl.integrations.kd.KDPlugin",)
    finally:
        set_plugins(None)


def test_the_mapping_is_json_clean():  # `sft_config.yaml` records `plugins` like any key
    from sft.config.convert import to_dict

    config = load_config_text(HEAD + f"plugins: [{LIGER}]\n", "yaml", machine_checks=False)
    assert json.loads(json.dumps(to_dict(config)))["plugins"] == [LIGER]


# -- Axolotl's single-field message keys ------------------------------------------------------------

THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def trained_row(config, tokenizer, row) -> str:
    from sft.data.pipeline import build_render
    from sft.data.tokenize import TokenizeOptions, process_chunk
    from sft.manager import get_plugins

    render = build_render(config.datasets[0], tokenizer, config, get_plugins())
    options = TokenizeOptions(
        sequence_len=256,
        excess_length_strategy="raise",
        invalid_rows="raise",
        train_on_inputs=False,
    )
    result = process_chunk([row], 0, render, tokenizer, options)
    ids, labels = result.input_ids[0], result.labels[0]
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])


def test_message_field_role_and_content_read_sharegpt_rows(plugins):
    special = ["<|user|>", "<|assistant|>", "<|end|>"]
    tokenizer = build_tokenizer(chat_template=TEMPLATE, special_tokens=special, eos_token="<|end|>")
    config = load_config_text(
        HEAD + "    field_messages: conversations\n    message_field_role: from\n"
        "    message_field_content: value\n",
        "yaml",
        machine_checks=False,
    )
    row = {
        "conversations": [
            {"from": "human", "value": "Capital?"},
            {"from": "gpt", "value": "Paris."},
        ]
    }
    assert trained_row(config, tokenizer, row) == "Paris.<|end|><|endoftext|>"


def test_field_thinking_names_the_reasoning_field(plugins):
    special = ["<|user|>", "<|assistant|>", "<|end|>"]
    tokenizer = build_tokenizer(
        chat_template=THINKING_TEMPLATE, special_tokens=special, eos_token="<|end|>"
    )
    config = load_config_text(HEAD + "    field_thinking: cot\n", "yaml", machine_checks=False)
    row = {
        "messages": [
            {"role": "user", "content": "Capital?"},
            {"role": "assistant", "content": "Paris.", "cot": "France's capital."},
        ]
    }
    assert trained_row(config, tokenizer, row) == "<think>France's capital.</think>Paris.<|end|>"


def test_single_field_keys_that_contradict_the_mappings_are_errors(plugins):
    with pytest.raises(ConfigError) as error:
        load_config_text(
            HEAD + "    message_field_role: from\n    message_property_mappings: {role: speaker}\n",
            "yaml",
            machine_checks=False,
        )
    problems = {p.path: p.message for p in error.value.problems}
    assert (
        "conflicts with message_property_mappings.role"
        in problems["datasets[0].message_field_role"]
    )


def test_xformers_attention_runs_as_sdpa_with_a_note(plugins):
    config = load_yaml("xformers_attention: true\n")
    assert config.attention == "sdpa"
    assert "runs as sft's 'sdpa'" in warnings_of(config)["xformers_attention"]
    problems = problems_of("xformers_attention: true\nflash_attention: true\n")
    assert any("conflicts with" in message for message in problems.values())


def test_low_cpu_mem_usage_true_is_what_transformers_does_anyway(plugins):
    for value in ("true", "false"):  # transformers 5 always loads that way
        assert load_yaml(f"low_cpu_mem_usage: {value}\n").warnings == ()


def test_an_attention_flag_beside_the_same_backend_is_no_conflict(plugins):
    config = load_yaml(
        "flash_attention: true\nattn_implementation: kernels-community/vllm-flash-attn3\n"
    )
    assert config.attention == "flash_attention_3"
    assert load_yaml("sdp_attention: true\nattn_implementation: sdpa\n").attention == "sdpa"
    problems = problems_of("flash_attention: true\nattn_implementation: sdpa\n")
    assert "conflicts with attn_implementation = 'sdpa'" in problems["flash_attention"]
    problems = problems_of("flash_attention: true\nsdp_attention: true\n")
    assert "conflicts with flash_attention" in problems["sdp_attention"]


def test_the_removed_sharegpt_type_says_how_to_write_it_now(plugins):
    with pytest.raises(ConfigError) as error:
        load_config_text(
            "base_model: m\ndatasets:\n  - path: x.jsonl\n    type: sharegpt.load_role\n",
            "yaml",
            machine_checks=False,
        )
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].type" and "removed ShareGPT type" in problem.message
    assert "type = 'chat_template'" in problem.hint


# -- keys that change nothing in Axolotl either, and bfloat16 ----------------------------------


def test_attention_is_not_an_axolotl_key_and_says_so(plugins):
    config = load_yaml("attention: flash\n")
    assert config.attention == "sdpa"  # as in Axolotl, which drops the key
    warning = warnings_of(config)["attention"]
    assert "not a key Axolotl defines" in warning and "default attention" in warning
    hint = next(w.hint for w in config.warnings if w.path == "attention")
    assert "attn_implementation = 'flash_attention_2'" in hint


def test_lora_fan_in_fan_out_warns_that_peft_decides_it(plugins, tiny_project):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = load_yaml("adapter: lora\nlora_fan_in_fan_out: true\n")
    assert (
        "peft sets it from each adapted layer's type" in warnings_of(config)["lora_fan_in_fan_out"]
    )
    # what the warning says: peft takes nn.Linear layers as not transposed whatever it is told
    from peft import LoraConfig, get_peft_model

    base = tiny_project("adapter=lora")
    model = load_model(base, load_tokenizer(base), get_plugins())
    told = get_peft_model(model, LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    assert told.peft_config["default"].fan_in_fan_out is False


def test_bfloat16_is_bf16(plugins):
    assert load_yaml("bfloat16: true\n").bf16 is True
    assert load_yaml("bfloat16: true\nbf16: true\n").bf16 is True
    assert load_yaml("bfloat16: false\n").bf16 == "auto"
    assert problems_of("bfloat16: true\nbf16: false\n") == {
        "bfloat16": "conflicts with bf16 = false (bfloat16 = True sets bf16 too)"
    }
    # Axolotl's archived examples write `bfloat16: auto`: bf16 = 'auto', whatever the machine
    assert load_yaml("bfloat16: auto\n").bf16 == "auto"
    assert load_yaml("bfloat16: auto\nbf16: true\n").bf16 is True
    assert "bfloat16" in problems_of("bfloat16: auto\nbf16: false\n")
    assert problems_of("bfloat16: true\nfp16: true\n")["fp16"] == (
        "conflicts with bfloat16 = true: choose one precision"
    )


def test_conversation_changes_nothing_on_types_other_than_alpaca_chat(plugins):
    config = load_config_text(
        "base_model: unused\ndatasets:\n  - path: x.jsonl\n    type: alpaca\n"
        "    conversation: qwen2\n",
        "yaml",
        machine_checks=False,
    )
    (warning,) = config.warnings
    assert warning.path == "datasets[0].conversation"
    assert "no effect on type 'alpaca': Axolotl reads it only for alpaca_chat" in warning.message
    with pytest.raises(ConfigError) as error:  # on a sharegpt dataset: the type is refused
        load_config_text(
            "base_model: unused\ndatasets:\n  - path: x.jsonl\n    type: sharegpt\n"
            "    conversation: chatml\n",
            "yaml",
            machine_checks=False,
        )
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].type" and "removed ShareGPT type" in problem.message


def test_axolotls_kernels_integration_is_a_speed_only_warning(plugins):
    config = load_yaml(
        "plugins:\n  - axolotl.integrations.kernels.KernelsPlugin\nuse_kernels: true\n"
    )
    warnings = warnings_of(config)
    assert (
        "KernelsPlugin" in warnings["plugins[0]"] and "only changes speed" in warnings["plugins[0]"]
    )
    assert "only changes speed" in warnings["use_kernels"]


def test_axolotls_internal_model_config_type_changes_nothing(plugins):
    config = load_yaml("model_config_type: deepseek_v3\n")
    assert "Axolotl overwrites it" in warnings_of(config)["model_config_type"]
