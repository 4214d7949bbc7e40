"""The fsdp plugin: Axolotl's FSDP keys in all their spellings → the Trainer's FSDP settings;
real 2-process FSDP2 runs (CPU, gloo) that save what 1 process saves; sharded checkpoints
merged into ordinary models.

accelerate runs FSDP on GPUs only (on a CPU it silently trains with DDP), so the 2-process runs
go through `fsdp_cpu.py`, which lifts that gate: torch's FSDP2 shards for real here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sft.plugins.fsdp as fsdp
from sft.config import load_config_text
from sft.errors import ConfigError, ModelError, UsageError
from sft.plugins.fsdp.settings import FsdpSettings, resolve

HARNESS = Path(__file__).with_name("fsdp_cpu.py")


def _config(plugins, text: str, machine_checks: bool = False):
    body = (
        'base_model = "unused"\n'
        + text.strip("\n")
        + '\n[[datasets]]\npath = "d.jsonl"\ntype = "chat_template"\n'
    )
    return load_config_text(body, source="c.toml", plugins=plugins, machine_checks=machine_checks)


def _problems(plugins, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _config(plugins, text)
    return caught.value.render()


# -- which keys turn FSDP on ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "on"),
    [
        ("", False),
        ("fsdp_version = 2", True),
        ("[fsdp_config]", True),
        ('fsdp = ["full_shard", "auto_wrap"]', True),
        ('fsdp = "full_shard auto_wrap"', True),
        ("fsdp = true", True),
        ("fsdp = []", False),
        ('fsdp = ""', False),
        ("fsdp = false\nfsdp_version = 2\n[fsdp_config]\noffload_params = true", False),
    ],
)
def test_selected_by_any_of_axolotls_keys(plugins, text, on):
    config = _config(plugins, text)
    assert fsdp.selected(config) is on
    backends = [b.name for _, b in plugins.distributed_backends().items() if b.selected(config)]
    assert backends == (["fsdp"] if on else [])


# -- the key forms map to transformers' fsdp_config ---------------------------------------------------


def test_current_axolotl_form(plugins):
    config = _config(
        plugins,
        """
fsdp_version = 2
[fsdp_config]
reshard_after_forward = false
state_dict_type = "SHARDED_STATE_DICT"
auto_wrap_policy = "TRANSFORMER_BASED_WRAP"
transformer_layer_cls_to_wrap = "Qwen2DecoderLayer"
offload_params = true
cpu_ram_efficient_loading = true
activation_checkpointing = true
""",
    )
    assert fsdp.settings_of(config).fsdp_config() == {
        "version": 2,
        "reshard_after_forward": False,
        "state_dict_type": "SHARDED_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
        "cpu_offload": True,
        "cpu_ram_efficient_loading": True,
        "activation_checkpointing": True,
    }


def test_older_axolotl_form_with_fsdp_prefixes_and_fsdp1(plugins):
    # Axolotl's older examples: the list switch and `fsdp_`-prefixed table keys (FSDP1).
    config = _config(
        plugins,
        """
fsdp = ["full_shard", "auto_wrap"]
[fsdp_config]
fsdp_version = 1
fsdp_limit_all_gathers = true
fsdp_sync_module_states = true
fsdp_offload_params = true
fsdp_use_orig_params = false
fsdp_cpu_ram_efficient_loading = true
fsdp_auto_wrap_policy = "TRANSFORMER_BASED_WRAP"
fsdp_transformer_layer_cls_to_wrap = "LlamaDecoderLayer"
fsdp_state_dict_type = "FULL_STATE_DICT"
fsdp_sharding_strategy = "FULL_SHARD"
""",
    )
    assert fsdp.settings_of(config).fsdp_config() == {
        "version": 1,
        "reshard_after_forward": "full_shard",
        "state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "cpu_offload": True,
        "cpu_ram_efficient_loading": True,
        "activation_checkpointing": False,
        "sync_module_states": True,
        "use_orig_params": False,
        "limit_all_gathers": True,
    }


@pytest.mark.parametrize(
    ("fsdp_value", "reshard", "offload"),
    [
        ('["full_shard", "auto_wrap"]', True, False),
        ('"shard_grad_op auto_wrap"', False, False),
        ('["full_shard", "auto_wrap", "offload"]', True, True),
        ("true", True, False),
    ],
)
def test_list_switch_defaults_to_fsdp2(plugins, fsdp_value, reshard, offload):
    settings = fsdp.settings_of(_config(plugins, f"fsdp = {fsdp_value}"))
    assert (settings.version, settings.reshard_after_forward, settings.offload_params) == (
        2,
        reshard,
        offload,
    )
    assert settings.state_dict_type == "FULL_STATE_DICT"  # final saves never hang on shards


def test_size_based_wrap_and_no_wrap(plugins):
    size = fsdp.settings_of(
        _config(
            plugins,
            '[fsdp_config]\nauto_wrap_policy = "size_based_wrap"\nmin_num_params = 1000',
        )
    )
    assert size.fsdp_config(("LlamaDecoderLayer",)) | {} == {
        **size.fsdp_config(),
        "auto_wrap_policy": "SIZE_BASED_WRAP",
        "min_num_params": 1000,
    }
    assert "transformer_layer_cls_to_wrap" not in size.fsdp_config(("LlamaDecoderLayer",))
    no_wrap = fsdp.settings_of(_config(plugins, '[fsdp_config]\nauto_wrap_policy = "NO_WRAP"'))
    assert "transformer_layer_cls_to_wrap" not in no_wrap.fsdp_config(("LlamaDecoderLayer",))


def test_settings_are_accepted_by_transformers_and_accelerate(monkeypatch):
    """The mapped settings build the engine's own FSDP plugin with the meaning intended."""
    from accelerate import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # transformers sets it
    settings, problems = resolve(
        ["shard_grad_op", "offload"],
        None,
        {"fsdp_state_dict_type": "SHARDED_STATE_DICT", "activation_checkpointing": True},
    )
    assert not problems
    args = TrainingArguments(
        output_dir="unused",
        use_cpu=True,
        report_to=[],
        fsdp=True,
        fsdp_config=settings.fsdp_config(("LlamaDecoderLayer",)),
    )
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is True


# -- problems: all reported together, with the key and a fix --------------------------------------------


def test_unknown_and_bad_values_are_reported_together(plugins):
    text = _problems(
        plugins,
        """
fsdp_version = 2
[fsdp_config]
fsdp_state_dict_typ = "SHARDED_STATE_DICT"
offload_params = "yes"
auto_wrap_policy = "transformer_wrap"
reshard_after_forward = 1
mixed_precision_policy = "bf16"
""",
    )
    assert (
        "fsdp_config.fsdp_state_dict_typ (line 4): unknown FSDP setting; did you mean 'state_dict_type'?"
        in text
    )
    assert "fsdp_config.offload_params (line 5): expected true or false, found 'yes'" in text
    assert "auto_wrap_policy (line 6): expected one of TRANSFORMER_BASED_WRAP" in text
    assert "did you mean 'TRANSFORMER_BASED_WRAP'?" in text
    assert "fsdp_config.reshard_after_forward (line 7): expected true or false" in text
    assert (
        "fsdp_config.mixed_precision_policy (line 8): is an Axolotl FSDP setting that sft does not support"
        in text
    )
    assert text.startswith("5 problems")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fsdp_version = 3", "fsdp_version (line 2): expected one of 1, 2, found integer 3"),
        ('fsdp = ["full_shrad"]', "unknown FSDP option 'full_shrad'; did you mean 'full_shard'?"),
        ("fsdp = 5", "fsdp (line 2): expected true or false, or a list of FSDP options"),
        (
            'fsdp = ["hybrid_shard"]',
            "hybrid_shard is an FSDP1 sharding strategy",
        ),
        (
            '[fsdp_config]\nstate_dict_type = "LOCAL_STATE_DICT"',
            "LOCAL_STATE_DICT is not supported",
        ),
        (
            '[fsdp_config]\nfinal_state_dict_type = "SHARDED_STATE_DICT"',
            "the final save is always a full state dict",
        ),
        (
            '[fsdp_config]\nauto_wrap_policy = "SIZE_BASED_WRAP"',
            "SIZE_BASED_WRAP needs min_num_params",
        ),
        (
            "[fsdp_config]\nmin_num_params = 100",
            "is used only with auto_wrap_policy = SIZE_BASED_WRAP",
        ),
        (
            "fsdp_version = 2\n[fsdp_config]\nfsdp_version = 1",
            "fsdp_config.fsdp_version (line 4): is 1 but fsdp_version is 2; keep one",
        ),
        (
            '[fsdp_config]\nstate_dict_type = "FULL_STATE_DICT"\nfsdp_state_dict_type = "FULL_STATE_DICT"',
            "is 'state_dict_type' written again; keep one spelling",
        ),
        (
            'fsdp = ["offload"]\n[fsdp_config]\noffload_params = false',
            "says offload but fsdp_config.offload_params is false",
        ),
        (
            'fsdp = ["shard_grad_op"]\n[fsdp_config]\nreshard_after_forward = true',
            "is true but the sharding strategy shard_grad_op means false",
        ),
        (
            "fsdp_version = 1\n[fsdp_config]\ncpu_ram_efficient_loading = true\nsync_module_states = false",
            "must be true with cpu_ram_efficient_loading under FSDP1",
        ),
    ],
)
def test_each_problem_names_the_key_and_the_fix(plugins, text, expected):
    assert expected in _problems(plugins, text)


def test_fsdp1_settings_under_fsdp2_are_warnings_not_passed_on(plugins):
    # Axolotl's older FSDP1 examples (no fsdp_version) carry these; FSDP2 needs none of them.
    config = _config(
        plugins,
        """
fsdp = ["full_shard", "auto_wrap"]
[fsdp_config]
fsdp_limit_all_gathers = true
fsdp_sync_module_states = true
fsdp_use_orig_params = false
fsdp_backward_prefetch = "BACKWARD_PRE"
fsdp_forward_prefetch = false
fsdp_cpu_ram_efficient_loading = true
""",
    )
    assert [(w.path, w.line) for w in config.warnings] == [
        ("fsdp_config.fsdp_limit_all_gathers", 4),
        ("fsdp_config.fsdp_sync_module_states", 5),
        ("fsdp_config.fsdp_use_orig_params", 6),
        ("fsdp_config.fsdp_backward_prefetch", 7),
        ("fsdp_config.fsdp_forward_prefetch", 8),
    ]
    first = config.warnings[0]
    assert first.warning
    assert first.message == (
        "has no effect under FSDP2 (sft's default without fsdp_version; Axolotl's is FSDP1): it "
        "throttles FSDP1's all-gathers; FSDP2 schedules its own; the trained model is the same"
    )
    assert first.hint == (
        "remove it to silence this, or set fsdp_version = 1 (deprecated in transformers) to use it"
    )
    assert "FSDP2 always trains the original parameters" in config.warnings[2].message
    passed = fsdp.settings_of(config).fsdp_config()
    assert passed["version"] == 2
    assert not {"limit_all_gathers", "sync_module_states", "use_orig_params"} & set(passed)
    assert not {"backward_prefetch", "forward_prefetch"} & set(passed)


def test_fsdp1_setting_with_fsdp2_named_says_no_default(plugins):
    config = _config(plugins, "fsdp_version = 2\n[fsdp_config]\nsync_module_states = true")
    (warning,) = config.warnings
    assert warning.path == "fsdp_config.sync_module_states" and warning.line == 4
    assert warning.message.startswith("has no effect under FSDP2 (fsdp_version = 2): every rank")


def test_fsdp1_settings_with_fsdp1_are_passed_on_without_warnings(plugins):
    config = _config(
        plugins, "fsdp_version = 1\n[fsdp_config]\nlimit_all_gathers = true\nuse_orig_params = true"
    )
    assert config.warnings == ()
    passed = fsdp.settings_of(config).fsdp_config()
    assert passed["limit_all_gathers"] is True and passed["use_orig_params"] is True


def test_combinations_fsdp_cannot_do_are_refused(plugins):
    text = _problems(
        plugins,
        """
load_in_8bit = true
optimizer = "adamw_8bit"
gradient_checkpointing = true
[fsdp_config]
activation_checkpointing = true
""",
    )
    assert "load_in_8bit (line 2): FSDP cannot shard bitsandbytes 8-bit weights" in text
    assert "optimizer" not in text  # bitsandbytes optimizers update FSDP2's shards
    assert "gradient_checkpointing (line 4): recomputes activations a second time" in text
    assert "[this machine]" not in text  # machine problems are skipped here (portable check)
    config = _config(plugins, 'adapter = "lora"\n[fsdp_config]\nactivation_checkpointing = true')
    (warning,) = config.warnings
    assert warning.path == "fsdp_config.activation_checkpointing" and warning.line == 4
    assert "with an adapter it runs as gradient_checkpointing" in warning.message


def test_cpu_only_machine_is_a_machine_problem(plugins, monkeypatch):
    import sft.hardware

    monkeypatch.setattr(sft.hardware, "cuda_present", lambda: False)
    (problem,) = fsdp.check(_config(plugins, "fsdp_version = 2"))
    assert problem.machine and problem.path == "fsdp_version"
    assert "silently use plain data parallelism" in problem.message
    monkeypatch.setattr(sft.hardware, "cuda_present", lambda: True)
    assert fsdp.check(_config(plugins, "fsdp_version = 2")) == []


def test_qlora_with_fsdp_on_a_cpu_only_machine_is_refused_at_validate(plugins, monkeypatch):
    import sft.hardware

    monkeypatch.setattr(sft.hardware, "cuda_present", lambda: False)
    with pytest.raises(ConfigError) as caught:
        _config(
            plugins,
            'adapter = "qlora"\nload_in_4bit = true\nfsdp_version = 2',
            machine_checks=True,
        )
    problems = {p.path: p for p in caught.value.problems}
    assert "load_in_4bit" not in problems  # bitsandbytes >= 0.48 quantizes on CPU too
    assert problems["fsdp_version"].machine  # FSDP through accelerate needs CUDA


def test_available_and_listed(plugins):
    backend = plugins.distributed_backends().get("fsdp")
    assert backend.available() == (True, "")
    assert plugins.distributed_backends().owner("fsdp") == "fsdp"


# -- the run's TrainingArguments -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from sft.testing import build_model, build_tokenizer

    return build_model(build_tokenizer(eos_token="</s>"))


def test_wrap_class_found_on_the_model_with_or_without_adapter(plugins, tiny_model, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = _config(plugins, "fsdp_version = 2")
    args = fsdp.training_args(config, tiny_model)
    assert args["fsdp"] is True
    assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    try:
        args = fsdp.training_args(config, peft_model)
        assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    finally:
        peft_model.unload()


def test_a_named_wrap_class_must_exist(plugins, tiny_model, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = _config(plugins, '[fsdp_config]\ntransformer_layer_cls_to_wrap = "QwenBlock"')
    with pytest.raises(ModelError, match=r"(?s)QwenBlock is not a module class.*LlamaDecoderLayer"):
        fsdp.training_args(config, tiny_model)


def test_a_single_plain_process_is_told_how_to_launch(plugins, tiny_model, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ModelError, match="--nproc-per-node"):
        fsdp.training_args(_config(plugins, "fsdp_version = 2"), tiny_model)


def test_final_save_switches_sharded_checkpoints_to_a_full_state_dict(plugins):
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    assert type(plugin.state_dict_config).__name__ == "ShardedStateDictConfig"
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    )
    config = _config(plugins, '[fsdp_config]\nstate_dict_type = "SHARDED_STATE_DICT"')
    fsdp.sft_before_save(config, None, "out", trainer)
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert type(plugin.state_dict_config).__name__ == "FullStateDictConfig"
    assert type(plugin.optim_state_dict_config).__name__ == "FullOptimStateDictConfig"


def test_settings_default():
    assert FsdpSettings().fsdp_config() == {
        "version": 2,
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_offload": False,
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": False,
    }


# -- real 2-process runs (CPU, gloo) -------------------------------------------------------------------


def _launch(
    config_path: Path, overrides: list[str], processes: int = 2, harness: bool = True
) -> str:
    """`sft run` on `processes` CPU processes; through the harness that lets accelerate run
    FSDP on a CPU, or as it is (`harness = False`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    sets = [part for item in overrides for part in ("--set", item)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *([str(HARNESS)] if harness else ["-m", "sft"]),
        "run",
        str(config_path),
        *sets,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _assert_same_weights(got: dict, want: dict, base: dict | None = None) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        difference = (got[name] - tensor).norm() / tensor.norm()
        assert difference <= 1e-5, f"{name}: relative difference {difference:.2e}"
        if base is not None and name in base:  # training moved it: the check is not vacuous
            assert (tensor - base[name]).norm() > 1e3 * (got[name] - tensor).norm(), name


# SGD keeps the comparison about the gradients: Adam's normalisation amplifies fp32 rounding
# differences of near-zero gradients by orders of magnitude within a few steps.
SHARED = ("optimizer=sgd", "learning_rate=0.1", "max_steps=3")
SHARDED = re.compile(r"fsdp2: \d+ units, (\d+) of \1 parameters sharded")


def _run_both(tiny_project, keys: tuple[str, ...], fsdp_keys: tuple[str, ...] = ()):
    """The same global batch (2) as 1 plain process (micro batch 2) and as 2 FSDP2 processes
    (micro batch 1 each); the first run prepares the data both use."""
    from conftest import TINY_CONFIG

    from sft.train.run import train

    tmp = tiny_project.tmp_path
    keys = (*SHARED, f"dataset_prepared_path={tmp}/prepared", *keys)
    train(tiny_project(f"output_dir={tmp}/one", *keys))
    path = tmp / "fsdp.toml"
    path.write_text(TINY_CONFIG.replace("{tmp}", str(tmp)))
    two = (*keys, f"output_dir={tmp}/two", "micro_batch_size=1", "fsdp_version=2", *fsdp_keys)
    return tmp / "one", tmp / "two", _launch(path, list(two))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "recompute",
    [
        ("gradient_checkpointing=true",),
        # FSDP's own activation checkpointing beside an adapter: runs as transformers'
        # layer-wise checkpointing, whose saved adapter is complete
        ("fsdp_config.activation_checkpointing=true",),
    ],
    ids=["gradient_checkpointing", "fsdp_activation_checkpointing"],
)
def test_lora_fsdp2_two_processes_save_what_one_process_saves(tiny_project, recompute):
    keys = ("adapter=lora", "lora_target_linear=true")
    fsdp_only = recompute[0].startswith("fsdp_config")
    one, two, output = _run_both(
        tiny_project, keys if fsdp_only else (*keys, *recompute), recompute if fsdp_only else ()
    )
    assert SHARDED.search(output), output[-3000:]  # FSDP2 really sharded the model
    if fsdp_only:
        assert "it runs as gradient_checkpointing" in output
    assert output.count("saved adapter to") == 1  # one process prints
    assert not (two / "model.safetensors").exists()
    saved = _weights(two / "adapter_model.safetensors")
    _assert_same_weights(saved, _weights(one / "adapter_model.safetensors"))

    from peft import AutoPeftModelForCausalLM, get_peft_model_state_dict

    model = AutoPeftModelForCausalLM.from_pretrained(two)  # plain peft loads it
    assert set(get_peft_model_state_dict(model)) == set(saved)  # peft's own key names
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.distributed
@pytest.mark.slow
def test_qlora_on_quantized_experts_fsdp2_two_processes_save_what_one_process_saves(
    tiny_project, tiny_moe
):
    """QLoRA with 4-bit fused expert weights (quantize_moe_experts) under FSDP2: the sharded
    packed weights save (torch's distributed state dict names them plainly), and the adapter,
    experts' LoRA included, equals one process's."""
    keys = (
        f"base_model={tiny_moe}",
        "adapter=qlora",
        "load_in_4bit=true",
        "quantize_moe_experts=true",
        "lora_target_modules=[q_proj]",
        "lora_target_parameters=['mlp.experts.gate_up_proj', 'experts.down_proj']",
    )
    one, two, output = _run_both(tiny_project, keys)
    # the experts' packed weights are sharded; accelerate keeps the 4 attention Linear4bit
    # weights (uint8 storage) whole, as it warns
    assert re.search(r"fsdp2: \d+ units, 14 of 18 parameters sharded", output), output[-3000:]
    saved = _weights(two / "adapter_model.safetensors")
    assert len([name for name in saved if "experts" in name]) == 4
    _assert_same_weights(saved, _weights(one / "adapter_model.safetensors"))


@pytest.mark.distributed
@pytest.mark.slow
def test_qat_fsdp2_two_processes_save_what_one_process_saves(tiny_project):
    """Quantization-aware training under FSDP2: the fake-quantized layers shard and train as
    in one process, and the final save gathers plain float weights."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'sft-train[qat]')")
    qat = ("qat={weight_dtype = 'int4', activation_dtype = 'int8', group_size = 32}",)
    one, two, output = _run_both(tiny_project, qat)
    assert SHARDED.search(output), output[-3000:]
    base = _weights(tiny_project.tmp_path / "tiny" / "model.safetensors")
    final, want = _weights(two / "model.safetensors"), _weights(one / "model.safetensors")
    assert sorted(final) == sorted(want) == sorted(base)  # plain layers, gathered
    # Rounding to int4/int8 turns fp32 differences of the two reductions into whole steps now
    # and then: equal to 5e-3, while training moved the weights over 10 times more.
    moved = 0
    for name, tensor in want.items():
        difference = (final[name] - tensor).norm()
        assert difference <= 5e-3 * tensor.norm(), name
        if not torch.equal(tensor, base[name]):
            moved += 1
            assert (tensor - base[name]).norm() > 10 * difference, name
    assert moved > len(want) // 2


@pytest.mark.distributed
@pytest.mark.slow
def test_full_fsdp2_sharded_checkpoints_merge_into_the_final_model(tiny_project, tmp_path):
    one, two, output = _run_both(
        tiny_project,
        ("save_steps=3",),
        (
            "fsdp_config.state_dict_type=SHARDED_STATE_DICT",
            "fsdp_config.activation_checkpointing=true",
        ),
    )
    assert SHARDED.search(output), output[-3000:]
    base = _weights(tiny_project.tmp_path / "tiny" / "model.safetensors")
    final = _weights(two / "model.safetensors")  # gathered although checkpoints are sharded
    _assert_same_weights(final, _weights(one / "model.safetensors"), base)

    checkpoint = two / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not list(checkpoint.glob("*.safetensors"))  # sharded: no full weights there

    from sft.sharded import merge_sharded

    merged, kind = merge_sharded(checkpoint, tmp_path / "merged")
    assert kind == "model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)  # plain transformers loads it
    state = model.state_dict()
    for name, tensor in final.items():
        assert torch.equal(state[name], tensor), name
    assert AutoTokenizer.from_pretrained(merged).chat_template

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        merge_sharded(checkpoint, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    merge_sharded(checkpoint, tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "taken" / "model.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_sharded_checkpoint_merges_into_the_final_adapter(tiny_project, tmp_path):
    from conftest import TINY_CONFIG

    from sft.sharded import merge_sharded

    tmp = tiny_project.tmp_path
    path = tmp / "fsdp.toml"
    path.write_text(TINY_CONFIG.replace("{tmp}", str(tmp)))
    output = _launch(
        path,
        [
            *SHARED,
            "max_steps=2",
            "save_steps=2",
            "adapter=lora",
            "lora_target_linear=true",
            "fsdp_version=2",
            "fsdp_config.state_dict_type=SHARDED_STATE_DICT",
        ],
    )
    assert SHARDED.search(output), output[-3000:]
    final = _weights(tmp / "out" / "adapter_model.safetensors")
    merged, kind = merge_sharded(tmp / "out" / "checkpoint-2", tmp_path / "adapter")
    assert kind == "adapter"
    assert sorted(p.name for p in merged.iterdir()) == [
        ".sft-output",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "sft_config.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    adapter = _weights(merged / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(final)
    assert all(torch.equal(adapter[k], final[k]) for k in final)

    import json

    from peft import AutoPeftModelForCausalLM

    written = json.loads((merged / "adapter_config.json").read_text())
    original = json.loads((tmp / "out" / "adapter_config.json").read_text())
    written["target_modules"] = sorted(written["target_modules"])
    original["target_modules"] = sorted(original["target_modules"])
    assert written == original  # as the run's own final save wrote it
    AutoPeftModelForCausalLM.from_pretrained(merged)  # plain peft loads it


def test_merge_sharded_refuses_what_is_not_a_sharded_checkpoint(tmp_path):
    from sft.sharded import merge_sharded

    with pytest.raises(UsageError, match="no such directory"):
        merge_sharded(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="full \\(not sharded\\) weights"):
        merge_sharded(tmp_path / "full", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no sharded model state"):
        merge_sharded(tmp_path / "empty", tmp_path / "out")


def test_merge_sharded_command_errors_are_one_line_with_exit_4(tmp_path):
    from test_cli import run_sft

    result = run_sft("merge-sharded", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert result.returncode == 4, result.stderr
    assert "no such directory" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    result = run_sft("merge-sharded", str(tmp_path))
    assert result.returncode == 4 and "--output" in result.stderr + result.stdout


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
@pytest.mark.parametrize("extra", [(), ("fsdp_config.activation_checkpointing=true",)])
def test_qlora_fsdp2_trains_and_saves_an_adapter_on_cuda(tiny_project, extra):
    """One GPU is enough for the FSDP path (one process, launched by torchrun). Not run where
    there is no GPU."""
    from conftest import TINY_CONFIG

    tmp = tiny_project.tmp_path
    path = tmp / "qlora.toml"
    path.write_text(TINY_CONFIG.replace("{tmp}", str(tmp)))
    sets = [
        "max_steps=2",
        "adapter=qlora",
        "load_in_4bit=true",
        "bf16=true",
        "lora_target_linear=true",
        "fsdp_version=2",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command += ["-m", "sft", "run", str(path), *[x for s in sets for x in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    from peft import AutoPeftModelForCausalLM

    saved = _weights(tmp / "out" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    AutoPeftModelForCausalLM.from_pretrained(tmp / "out")


def test_quantized_moe_experts_with_4bit_qlora_are_accepted_under_fsdp(plugins):
    config = _config(
        plugins,
        'adapter = "qlora"\nload_in_4bit = true\nquantize_moe_experts = true\nfsdp_version = 2',
    )
    assert config.quantize_moe_experts and fsdp.selected(config)


@pytest.mark.distributed
@pytest.mark.slow
def test_full_fsdp2_with_chunked_cross_entropy_trains_what_one_process_trains(tiny_project):
    """The chunked loss reads the (tied, trained) LM head's weight inside the model's forward:
    under FSDP2 it must see the gathered weight and hand its gradient back to the shards."""
    one, two, output = _run_both(tiny_project, ("chunked_cross_entropy=true",))
    assert SHARDED.search(output), output[-3000:]
    base = _weights(tiny_project.tmp_path / "tiny" / "model.safetensors")
    final = _weights(two / "model.safetensors")
    _assert_same_weights(final, _weights(one / "model.safetensors"), base)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_bnb_8bit_adamw_under_fsdp2_trains_and_resumes_exactly(tiny_project, state_dict_type):
    """Axolotl's FSDP2 examples train with `adamw_bnb_8bit` / `paged_adamw_8bit`: the 8-bit
    AdamW updates each process's shards, and checkpoints hold every process's 8-bit state,
    so a run resumed from one ends with the weights of the uninterrupted run."""
    import shutil

    from conftest import TINY_CONFIG

    from sft.plugins.bnb_optim.sharded import SHARDS

    adam = ("optimizer=adamw_bnb_8bit", "learning_rate=0.001", "max_steps=4", "save_steps=2")
    fsdp_keys = (f"fsdp_config.state_dict_type={state_dict_type}",)
    one, two, output = _run_both(tiny_project, adam, fsdp_keys)
    assert SHARDED.search(output), output[-3000:]
    base = _weights(tiny_project.tmp_path / "tiny" / "model.safetensors")
    final, want = _weights(two / "model.safetensors"), _weights(one / "model.safetensors")
    assert sorted(final) == sorted(want)
    for name, tensor in want.items():  # the same optimizer, its 8-bit blocks laid over shards
        moved = (tensor - base[name]).norm()
        assert moved > 0, name
        assert (final[name] - tensor).norm() <= 0.05 * moved, name

    if state_dict_type == "FULL_STATE_DICT":  # every process's 8-bit state, in one file
        saved = torch.load(two / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
        shards = [entry[SHARDS] for entry in saved.values()]
        assert all(sorted(s) == ["0", "1"] for s in shards)
        assert any(s["1"]["state1"].dtype == torch.uint8 for s in shards)

    tmp = tiny_project.tmp_path
    three = tmp / "three"
    three.mkdir()
    shutil.copytree(two / "checkpoint-2", three / "checkpoint-2")
    path = tmp / "fsdp.toml"
    path.write_text(TINY_CONFIG.replace("{tmp}", str(tmp)))
    keys = (*SHARED, f"dataset_prepared_path={tmp}/prepared", *adam, "micro_batch_size=1")
    _launch(
        path,
        [
            *keys,
            f"output_dir={three}",
            "fsdp_version=2",
            *fsdp_keys,
            "auto_resume_from_checkpoints=true",
        ],
    )
    resumed = _weights(three / "model.safetensors")
    for name, tensor in final.items():
        assert torch.equal(resumed[name], tensor), name


def test_an_8bit_optimizer_state_from_another_number_of_processes_is_refused():
    """Each process's 8-bit blocks lie over its own shard: such a state cannot be loaded by
    another number of processes (here one)."""
    pytest.importorskip("bitsandbytes")
    from sft.errors import ModelError
    from sft.manager import get_plugins
    from sft.plugins.bnb_optim.sharded import SHARDS

    factory = get_plugins().optimizers().get("adamw_bnb_8bit").factory
    layer = torch.nn.Linear(64, 64)

    class Keys:
        learning_rate, weight_decay = 1e-3, 0.0
        optimizer = "adamw_bnb_8bit"

    optimizer = factory([{"params": list(layer.parameters())}], Keys())
    state = optimizer.state_dict()
    shard = {"state1": torch.zeros(32, 64, dtype=torch.uint8)}
    state["state"] = {0: {"step": 2, SHARDS: {"0": shard, "1": shard}}}
    with pytest.raises(ModelError, match="saved by 2 processes, and this run has 1"):
        optimizer.load_state_dict(state)
