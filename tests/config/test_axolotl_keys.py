"""Axolotl keys sft refuses: each says what it does in Axolotl and what to use instead; blank,
null or false values of them are accepted, and none of them is also a key sft reads."""

from __future__ import annotations

import textwrap

import attrs
import pytest

from sft.config import axolotl, load_config_text
from sft.config.schema import Config, DatasetConfig
from sft.errors import ConfigError

HEAD = "base_model: unused\ndatasets:\n  - path: x.jsonl\n    type: chat_template\n"


def load_yaml(text: str):
    return load_config_text(HEAD + textwrap.dedent(text), "yaml")


def only_problem(text: str):
    with pytest.raises(ConfigError) as error:
        load_yaml(text)
    (problem,) = error.value.problems
    return problem


TABLES = {"root": axolotl.UNSUPPORTED_ROOT_KEYS, "dataset": axolotl.UNSUPPORTED_DATASET_KEYS}


@pytest.mark.parametrize("scope", TABLES)
def test_every_refused_key_says_what_it_does_in_axolotl(scope):
    for name, entry in TABLES[scope].items():
        assert entry.what.strip(), f"{name}: no `what`"
        assert entry.instead is None or entry.instead.strip(), f"{name}: blank `instead`"


def test_each_refused_key_has_one_topic():
    by_topic = axolotl.UNSUPPORTED_ROOT_BY_TOPIC.values()
    assert sum(len(table) for table in by_topic) == len(axolotl.UNSUPPORTED_ROOT_KEYS)


def test_a_refused_key_names_itself_and_what_it_does(plugins):
    problem = only_problem("quantize_moe_experts: true\n")
    assert problem.path == "quantize_moe_experts" and problem.line == 5
    assert problem.message == (
        "Axolotl's `quantize_moe_experts` — quantizes MoE expert weights at load "
        "(with load_in_4bit/8bit) — is not supported by sft"
    )
    assert problem.hint == "remove it (or leave it blank)"


def test_a_refused_key_with_an_alternative_says_what_to_use(plugins):
    problem = only_problem("lora_target_parameters:\n  - experts.gate_up_proj\n")
    assert problem.path == "lora_target_parameters"
    assert problem.message == (
        "Axolotl's `lora_target_parameters` — adds LoRA to parameters by name, such as fused "
        "MoE expert weights — is not supported by sft"
    )
    assert problem.hint == (
        "remove it; instead, use `lora_target_modules` for the attention/MLP projections"
    )


def test_rl_training_is_refused_as_such(plugins):
    problem = only_problem("rl: dpo\n")
    assert problem.message == (
        "Axolotl's `rl` — preference/RL training (DPO, ORPO, KTO, GRPO); sft does supervised "
        "fine-tuning — is not supported by sft"
    )


def test_a_refused_dataset_key_is_named_at_its_entry(plugins):
    with pytest.raises(ConfigError) as error:
        load_config_text(HEAD + "    message_field_role: from\n", "yaml")
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].message_field_role" and problem.line == 5
    assert problem.message == (
        "Axolotl's dataset key `message_field_role` — older name: the message field holding "
        "the role — is not supported by sft"
    )
    assert problem.hint == ("remove it; instead, use `message_property_mappings: {role: <field>}`")


def test_several_refused_keys_are_reported_together(plugins):
    with pytest.raises(ConfigError) as error:
        load_yaml("fp8: true\nuse_scattermoe: true\ntrackio_project_name: demo\n")
    assert [p.path for p in error.value.problems] == [
        "fp8",
        "use_scattermoe",
        "trackio_project_name",
    ]


def test_blank_null_false_and_empty_values_of_refused_keys_are_accepted(plugins):
    config = load_config_text(
        HEAD
        + "    message_field_role:\n    field_thinking: ''\n"
        + textwrap.dedent(
            """\
            quantize_moe_experts: false
            lora_target_parameters: []
            model_quantization_config_kwargs: {}
            rl:
            trackio_project_name:
            use_scattermoe: null
            """
        ),
        "yaml",
        machine_checks=False,  # x.jsonl need not exist
    )
    assert config == load_config_text(HEAD, "yaml", machine_checks=False)


def test_a_value_equal_to_axolotls_own_default_is_inert():
    assert axolotl.is_inert(True, "save_safetensors")
    assert axolotl.is_inert(True, "experimental_skip_move_to_device")
    assert not axolotl.is_inert(True, "quantize_moe_experts")
    assert not axolotl.is_inert(True)  # without the key's name only blank/false values are
    assert axolotl.is_inert(False) and axolotl.is_inert("") and axolotl.is_inert({})


def test_no_refused_key_is_a_key_sft_reads(plugins):
    reads = {
        "root": {field.name for field in attrs.fields(Config)},
        "dataset": {field.name for field in attrs.fields(DatasetConfig)},
    }
    for _, keys in plugins.config_keys():
        reads[keys.scope] |= {field.name for field in attrs.fields(keys.cls)}
    for scope, table in TABLES.items():
        assert not set(table) & reads[scope], f"{scope} keys both read and refused"


def test_mapped_keys_are_not_refused():
    assert not set(axolotl.MAPPED_KEYS) & set(axolotl.UNSUPPORTED_ROOT_KEYS)
    assert set(axolotl.MAPPED_KEYS) >= axolotl.IGNORED_ROOT_KEYS
