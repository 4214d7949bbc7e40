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
    problem = only_problem("context_parallel_size: 2\n")
    assert problem.path == "context_parallel_size" and problem.line == 5
    assert problem.message == (
        f"Axolotl's `context_parallel_size` — "
        f"{axolotl.UNSUPPORTED_ROOT_KEYS['context_parallel_size'].what} "
        "— is not supported by sft"
    )
    assert problem.hint == "remove it (or leave it blank)"


def test_a_refused_key_with_an_alternative_says_what_to_use(plugins):
    problem = only_problem("gptq: true\n")
    assert problem.path == "gptq"
    assert problem.message == (
        "Axolotl's `gptq` — trains an adapter on a GPTQ-quantized model — is not supported by sft"
    )
    assert problem.hint == "remove it; instead, use `load_in_4bit` (QLoRA)"


def test_rl_training_is_refused_as_such(plugins):
    problem = only_problem("rl: dpo\n")
    assert problem.message == (
        "Axolotl's `rl` — preference/RL training (DPO, ORPO, KTO, GRPO); sft does supervised "
        "fine-tuning — is not supported by sft"
    )


def test_a_refused_dataset_key_is_named_at_its_entry(plugins):
    with pytest.raises(ConfigError) as error:
        load_config_text(
            HEAD.replace("chat_template", "sharegpt") + "    field_human: from\n", "yaml"
        )
    problem = next(p for p in error.value.problems if p.path == "datasets[0].field_human")
    assert problem.line == 5
    assert problem.message == (
        "Axolotl's dataset key `field_human` — old sharegpt format: field of the human turns — "
        "is not supported by sft"
    )
    assert problem.hint == "remove it; instead, use `type: chat_template`"


def test_several_refused_keys_are_reported_together(plugins):
    with pytest.raises(ConfigError) as error:
        load_yaml("fp8: true\ncontext_parallel_size: 2\ntrackio_project_name: demo\n")
    assert [p.path for p in error.value.problems] == [
        "fp8",
        "context_parallel_size",
        "trackio_project_name",
    ]


def test_blank_null_false_and_empty_values_of_refused_keys_are_accepted(plugins):
    config = load_config_text(
        HEAD
        + "    field_human:\n    conversation: ''\n"
        + textwrap.dedent(
            """\
            use_sonicmoe: false
            gptq_disable_exllama: false
            accelerator_config: {}
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
    assert not axolotl.is_inert(True, "use_scattermoe")
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


# -- keys set yet changing nothing: warnings, not errors ------------------------------------------


def load_warnings(text: str, head: str = HEAD):
    config = load_config_text(head + textwrap.dedent(text), "yaml", machine_checks=False)
    return config.warnings


SPEED_ONLY = [name for name, entry in axolotl.UNSUPPORTED_ROOT_KEYS.items() if entry.speed_only]


def test_a_speed_only_key_is_a_warning_that_says_so(plugins):
    (warning,) = load_warnings("lora_qkv_kernel: true\n")
    assert warning.warning and warning.path == "lora_qkv_kernel" and warning.line == 5
    assert warning.message == (
        "has no effect in sft: Axolotl's `lora_qkv_kernel` — Axolotl's fused Triton LoRA kernel "
        "for the q/k/v projections — only changes speed; sft trains the same model without it"
    )
    assert warning.hint == "remove it to silence this"


def test_a_speed_only_key_with_an_alternative_names_it(plugins):
    (warning,) = load_warnings("flash_attn_rms_norm: true\n")
    assert warning.hint == "remove it to silence this (for the speed, use `liger_rms_norm`)"


@pytest.mark.parametrize("name", SPEED_ONLY)
def test_every_speed_only_key_loads_with_a_warning(plugins, name):
    (warning,) = load_warnings(f"{name}: true\n")
    assert warning.path == name and "only changes speed" in warning.message


def test_the_speed_only_keys_are_the_kernel_choices():
    assert set(SPEED_ONLY) >= {
        "lora_qkv_kernel",
        "lora_o_kernel",
        "lora_mlp_kernel",
        "flash_attn_rms_norm",
        "flash_attn_fuse_qkv",
        "flash_attn_fuse_mlp",
        "fused_attn_kernel",
        "liger_rms_norm_gated",
    }
    # These change what is trained or its numbers: never speed only.
    assert not {"context_parallel_size", "fp8", "tiled_mlp", "qat"} & set(SPEED_ONLY)


def test_warnings_do_not_hide_errors_and_errors_do_not_include_warnings(plugins):
    with pytest.raises(ConfigError) as error:
        load_yaml("lora_mlp_kernel: true\nfp8: true\nfused_attn_kernel: true\n")
    assert [p.path for p in error.value.problems] == ["fp8"]


def test_a_key_read_only_through_blank_keys_is_a_warning(plugins):
    (warning,) = load_warnings("eval_table_size:\neval_max_new_tokens: 128\n")
    assert warning.path == "eval_max_new_tokens" and warning.line == 6
    assert warning.message == (
        "has no effect: Axolotl's `eval_max_new_tokens` — tokens generated for the "
        "eval_table_size / do_causal_lm_eval predictions — only matters with `eval_table_size` "
        "or `do_causal_lm_eval`, which are not set"
    )
    assert warning.hint == "remove it to silence this"
    (older,) = load_warnings("eval_table_max_new_tokens: 128\ndo_causal_lm_eval: false\n")
    assert older.path == "eval_table_max_new_tokens" and older.message.startswith("has no effect")


def test_a_key_read_through_a_set_key_is_refused_with_it(plugins):
    with pytest.raises(ConfigError) as error:
        load_yaml("eval_table_size: 5\neval_max_new_tokens: 128\n")
    problems = {p.path: p for p in error.value.problems}
    assert set(problems) == {"eval_table_size", "eval_max_new_tokens"}
    assert problems["eval_max_new_tokens"].message.endswith("is not supported by sft")
    assert not problems["eval_max_new_tokens"].warning


def test_a_model_family_hint_axolotl_sets_itself_is_a_warning(plugins):
    head = HEAD.replace("base_model: unused", "base_model: NousResearch/Llama-2-7b-hf")
    (warning,) = load_warnings("is_llama_derived_model: true\n", head)
    assert warning.path == "is_llama_derived_model"
    assert warning.message == (
        "has no effect: Axolotl's `is_llama_derived_model` — internal: tells Axolotl the model "
        "is Llama-based — Axolotl already sets it for base_model 'NousResearch/Llama-2-7b-hf' "
        "(its name contains 'llama')"
    )
    head = HEAD.replace("base_model: unused", "base_model: mistralai/Mistral-7B-v0.1")
    assert [w.path for w in load_warnings("is_mistral_derived_model: true\n", head)] == [
        "is_mistral_derived_model"
    ]


def test_a_model_family_hint_for_another_model_is_refused(plugins):
    problem = only_problem("is_llama_derived_model: true\n")  # base_model: unused
    assert problem.message.endswith("is not supported by sft") and not problem.warning
    head = HEAD.replace("base_model: unused", "base_model: llama-fans/Qwen2-7B")
    with pytest.raises(ConfigError):  # only the last path part counts, as in Axolotl
        load_config_text(head + "is_llama_derived_model: true\n", "yaml")


def test_warnings_from_structuring_and_checks_are_shown_together_in_file_order(plugins):
    warnings = load_warnings("fused_attn_kernel: true\neval_steps: 10\nlora_o_kernel: true\n")
    assert [(w.path, w.line) for w in warnings] == [
        ("fused_attn_kernel", 5),
        ("eval_steps", 6),  # from the checks: there is no eval set
        ("lora_o_kernel", 7),
    ]


# -- 0 as "none" ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(axolotl.ZERO_IS_BLANK))
def test_zero_is_axolotls_none_for_eval_and_save_intervals(plugins, name):
    # Axolotl tests these for truth: 0 is the same as leaving the key out.
    config = load_config_text(HEAD + f"{name}: 0\n", "yaml", machine_checks=False)
    assert config == load_config_text(HEAD, "yaml", machine_checks=False)
    assert getattr(config, name) is None and config.warnings == ()


def test_zero_stays_out_of_bounds_for_other_keys(plugins):
    problem = only_problem("logging_steps: 0\n")
    assert problem.path == "logging_steps" and "≥ 1" in problem.message
    with pytest.raises(ConfigError):
        load_yaml("evals_per_epoch: -1\n")


def test_keys_axolotl_itself_drops_are_accepted_with_a_warning_saying_so(plugins):
    """eta_min / adam_eps / test_value appear in Axolotl's examples but not in its schema: it
    drops them, so the run is Axolotl's run; the warning says what was presumably meant."""
    config = load_config_text(
        "base_model: m\ndatasets:\n  - path: a\nlr_scheduler: cosine\neta_min: 7e-7\n"
        "adam_eps: 1e-6\n",
        "yaml",
        machine_checks=False,
    )
    eta_min, adam_eps = config.warnings
    assert (eta_min.path, eta_min.line, adam_eps.path) == ("eta_min", 5, "adam_eps")
    assert "has no effect" in eta_min.message and "Axolotl drops it unread" in eta_min.message
    assert "cosine_min_lr_ratio" in (eta_min.hint or "")
    assert "adam_epsilon" in (adam_eps.hint or "")
    assert config.cosine_min_lr_ratio is None and config.adam_epsilon == 1e-8  # the defaults
    fields = {f.name for f in attrs.fields(Config)}
    assert not set(axolotl.NOT_AXOLOTL_KEYS) & fields
