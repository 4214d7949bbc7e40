"""The `deepspeed` plugin: the key (preset, JSON file, table), its checks, what the Trainer gets,
and real DeepSpeed runs on CPU (2 processes over gloo; 1 process without a launcher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, tiny_rows, write_jsonl

import sft.plugins.deepspeed as ds
from sft.config import load_config_text
from sft.errors import ConfigError
from sft.hardware import installed


def load(text: str, fmt: str = "toml", machine_checks: bool = False):
    """A config of `text` (on line 2 on) with a model and a dataset."""
    if fmt == "toml":
        body = f'base_model = "m"\n{text}\n[[datasets]]\npath = "a"\n'
    else:
        body = f"base_model: m\n{text}\ndatasets:\n  - path: a\n"
    return load_config_text(body, fmt=fmt, machine_checks=machine_checks)


def problems(text: str, machine_checks: bool = False) -> list:
    with pytest.raises(ConfigError) as caught:
        load(text, machine_checks=machine_checks)
    return [p for p in caught.value.problems if p.path == "deepspeed"]


def only(text: str, machine_checks: bool = False):
    (problem,) = problems(text, machine_checks)
    return problem


# -- the key -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ds.PRESETS)
def test_every_shipped_preset_loads_and_fits_a_plain_config(plugins, preset):
    config = load(f'deepspeed = "{preset}"\n')
    assert ds.selected(config) and not ds.check(config)
    table = ds.build(config)
    assert table["zero_optimization"]["stage"] == int(preset[4])
    assert "optimizer" not in table and "scheduler" not in table
    if preset.startswith("zero3"):
        assert table["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_presets_ship_as_package_data():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sft.plugins.deepspeed"]
    shipped = {p.stem for pattern in patterns for p in (REPO / "plugins/deepspeed").glob(pattern)}
    assert shipped == set(ds.PRESETS)


def test_a_blank_or_false_value_leaves_deepspeed_off(plugins):
    for text in ('deepspeed = ""\n', "deepspeed = false\n", ""):
        assert not ds.selected(load(text))
    assert not ds.selected(load("deepspeed:\n", fmt="yaml"))


def test_an_inline_table_in_toml_and_a_mapping_in_yaml(plugins):
    toml = load(
        "[deepspeed]\ntrain_micro_batch_size_per_gpu = 'auto'\n[deepspeed.zero_optimization]\nstage = 2\n"
    )
    yaml = load("deepspeed:\n  zero_optimization:\n    stage: 2\n", fmt="yaml")
    assert ds.build(toml)["zero_optimization"] == {"stage": 2}
    # What it leaves out follows sft's keys (DeepSpeed's own default would be accumulation 1,
    # no clipping, or no start at all without a micro-batch size).
    assert ds.build(yaml) == {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    assert ds.build(toml) is not ds.build(toml)  # a fresh copy: the Trainer edits it


def test_a_json_file_relative_to_the_working_directory_or_under_home(
    plugins, tmp_path, monkeypatch
):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    monkeypatch.chdir(tmp_path)
    assert ds.build(load('deepspeed = "ds.json"\n'))["zero_optimization"]["stage"] == 1
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ds.build(load('deepspeed = "~/ds.json"\n'))["zero_optimization"]["stage"] == 1


def test_a_missing_file_is_a_config_error_naming_the_key_and_its_line(plugins, tmp_path):
    problem = only(f'seed = 1\ndeepspeed = "{tmp_path}/nope.json"\n', machine_checks=True)
    assert problem.line == 3 and "file not found" in problem.message
    relative = only('deepspeed = "configs/nope.json"\n', machine_checks=True)
    assert "working directory" in relative.hint


def test_an_axolotl_deepspeed_configs_path_points_to_the_preset(plugins):
    problem = only('deepspeed = "deepspeed_configs/zero3_bf16.json"\n', machine_checks=True)
    assert "file not found" in problem.message
    assert problem.hint == "sft ships this configuration as a preset: deepspeed = 'zero3'"


def test_invalid_json_names_the_line_in_the_file(plugins, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {"enabled": true,}\n}\n')
    problem = only(f'deepspeed = "{path}"\n')
    assert problem.line == 2
    assert f"{path}: invalid JSON at line 3, column" in problem.message
    path.write_text('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 3}}')
    assert "duplicate key 'zero_optimization'" in only(f'deepspeed = "{path}"\n').message
    path.write_text("[1, 2]")
    assert "is a JSON object" in only(f'deepspeed = "{path}"\n').message


def test_an_unknown_preset_gets_a_did_you_mean(plugins):
    problem = only('deepspeed = "zero4"\n')
    assert "unknown DeepSpeed preset 'zero4'; did you mean 'zero3'?" in problem.message
    assert "zero3_offload" in problem.message and "JSON file" in problem.hint
    assert "did you mean 'zero3_offload'" in only('deepspeed = "zero3_ofload"\n').message
    assert only('deepspeed = "fast"\n').message.startswith(
        "unknown DeepSpeed preset 'fast'. Presets:"
    )


def test_a_value_of_the_wrong_kind_is_refused(plugins):
    assert "found integer 3" in only("deepspeed = 3\n").message
    assert "found boolean true" in only("deepspeed = true\n").message


# -- the DeepSpeed config against sft's keys -----------------------------------------------------


def test_an_optimizer_or_scheduler_section_is_refused_not_silently_used(plugins):
    found = problems(
        "[deepspeed]\nzero_optimization = {stage = 2}\n"
        "optimizer = {type = 'AdamW', params = {lr = 'auto'}}\n"
        "scheduler = {type = 'WarmupLR'}\n"
    )
    messages = " | ".join(p.message for p in found)
    assert (
        "section 'optimizer'; sft builds the optimizer from its optimizer key (now 'adamw_torch')"
        in messages
    )
    assert (
        "section 'scheduler'; sft builds the scheduler from lr_scheduler (now 'cosine')" in messages
    )
    assert all("remove the" in p.hint for p in found)


def test_values_that_contradict_sft_keys_are_reported_before_the_run(plugins):
    found = problems(
        "micro_batch_size = 2\ngradient_accumulation_steps = 4\nmax_grad_norm = 1.0\n"
        "[deepspeed]\nzero_optimization = {stage = 2}\ntrain_micro_batch_size_per_gpu = 8\n"
        "gradient_accumulation_steps = 4\ngradient_clipping = 0.5\nfp16 = {enabled = true}\n"
    )
    messages = [p.message for p in found]
    assert any(
        "train_micro_batch_size_per_gpu = 8" in m and "micro_batch_size = 2" in m for m in messages
    )
    assert any("gradient_clipping = 0.5" in m and "max_grad_norm = 1.0" in m for m in messages)
    assert any("fp16.enabled = true" in m for m in messages)
    assert not any("gradient_accumulation_steps = 4 in" in m for m in messages)  # it agrees
    assert len(found) == 3


def test_an_auto_value_nothing_fills_is_reported(plugins):
    problem = only("[deepspeed]\nzero_optimization = {stage = 2, allgather_bucket_size = 'auto'}\n")
    assert 'zero_optimization.allgather_bucket_size = "auto"' in problem.message


def test_a_table_without_zero_optimization_or_with_a_bad_stage(plugins):
    assert "no zero_optimization table" in only("[deepspeed]\nbf16 = {enabled = 'auto'}\n").message
    assert (
        "ZeRO stages are 0, 1, 2 and 3"
        in only("deepspeed = {zero_optimization = {stage = 4}}\n").message
    )


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_zero3_refuses_a_bitsandbytes_quantized_model(plugins, flag):
    problem = only(f'{flag} = true\nadapter = "lora"\ndeepspeed = "zero3"\n')
    assert "ZeRO-3 partitions parameters" in problem.message and flag in problem.message
    load(f'{flag} = true\nadapter = "lora"\ndeepspeed = "zero2"\n')  # ZeRO-2 is fine


def test_zero3_gathers_16bit_weights_unless_the_config_says_otherwise(plugins):
    table = ds.build(load("deepspeed = {zero_optimization = {stage = 3}}\n"))
    assert table["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    table = ds.build(
        load(
            "deepspeed = {zero_optimization = {stage = 3, gather_16bit_weights_on_model_save = false}}\n"
        )
    )
    assert "stage3_gather_16bit_weights_on_model_save" not in table["zero_optimization"]
    stage2 = ds.build(load('deepspeed = "zero2"\n'))
    assert "stage3_gather_16bit_weights_on_model_save" not in stage2["zero_optimization"]


def test_offload_keeps_sft_optimizer(plugins):
    # accelerate swaps a torch AdamW for DeepSpeedCPUAdam (the same update); anything else it
    # would turn into Adam, so sft tells DeepSpeed to keep its optimizer.
    adamw = ds.build(load('deepspeed = "zero3_offload"\n'))
    assert "zero_force_ds_cpu_optimizer" not in adamw
    sgd = ds.build(load('optimizer = "sgd"\ndeepspeed = "zero3_offload"\n'))
    assert sgd["zero_force_ds_cpu_optimizer"] is False
    forced = only(
        'optimizer = "sgd"\n[deepspeed]\nzero_force_ds_cpu_optimizer = true\n'
        "zero_optimization = {stage = 2, offload_optimizer = {device = 'cpu'}}\n"
    )
    assert "not optimizer = 'sgd'" in forced.message
    bnb = only('optimizer = "adamw_bnb_8bit"\ndeepspeed = "zero3_offload"\n')
    assert "is a bitsandbytes optimizer" in bnb.message and "CPU memory" in bnb.message


def test_offload_without_a_compiler_for_deepspeed_cpu_adam_is_a_machine_problem(
    plugins, monkeypatch
):
    monkeypatch.setattr(ds, "_compiler", lambda: None)
    monkeypatch.setattr(ds, "_prebuilt_op", lambda name: False)
    problem = only('deepspeed = "zero3_offload"\n', machine_checks=True)
    assert problem.machine and "DeepSpeedCPUAdam" in problem.message
    assert (
        "C++ compiler" in problem.message and "zero_force_ds_cpu_optimizer = false" in problem.hint
    )
    load('deepspeed = "zero3_offload"\n')  # --portable: not about the config
    # sft's own optimizer stepped on the CPU needs no compiled op
    load('optimizer = "sgd"\ndeepspeed = "zero3_offload"\n', machine_checks=True)


def test_offload_settings_deepspeed_cannot_run(plugins):
    stage2 = only(
        "deepspeed = {zero_optimization = {stage = 2, offload_param = {device = 'cpu'}}}\n"
    )
    assert "only ZeRO stage 3" in stage2.message
    nvme = problems(
        "deepspeed = {zero_optimization = {stage = 3, offload_param = {device = 'nvme'}}}\n"
    )
    assert any("set its nvme_path" in p.message for p in nvme)
    device = only(
        "deepspeed = {zero_optimization = {stage = 3, offload_param = {device = 'gpu'}}}\n"
    )
    assert "offloads to 'cpu' or 'nvme'" in device.message


def test_not_installed_is_a_machine_problem_and_available_says_how_to_install(plugins, monkeypatch):
    monkeypatch.setattr(ds, "installed", lambda module: False)
    assert ds.available() == (False, "pip install 'sft-train[deepspeed]'")
    problem = only('deepspeed = "zero2"\n', machine_checks=True)
    assert problem.machine and problem.hint == "pip install 'sft-train[deepspeed]'"
    monkeypatch.setattr(ds, "installed", lambda module: True)
    assert ds.available() == (True, "")


def test_the_backend_is_registered_and_selected_by_the_key(plugins):
    backend = plugins.distributed_backends().get("deepspeed")
    assert backend.selected(load('deepspeed = "zero1"\n'))
    assert not backend.selected(load(""))


# -- what the Trainer gets -----------------------------------------------------------------------


LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher variables; those the plugin sets are removed again after the test."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so teardown restores the original state
        monkeypatch.delenv(name)


def test_training_args_checkpoint_reentrantly_unless_the_config_says(plugins, no_launcher):
    args = ds.training_args(load('deepspeed = "zero3"\ngradient_checkpointing = true\n'), None)
    assert args["deepspeed"]["zero_optimization"]["stage"] == 3
    assert args["activation_checkpointing"] is True
    assert args["activation_checkpointing_kwargs"] == {"use_reentrant": True}
    own = ds.training_args(
        load(
            'deepspeed = "zero3"\ngradient_checkpointing = true\n'
            "gradient_checkpointing_kwargs = {use_reentrant = false}\n"
        ),
        None,
    )
    assert own["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert "activation_checkpointing" not in ds.training_args(load('deepspeed = "zero2"\n'), None)


def test_one_process_without_a_launcher_becomes_rank_0_of_1(plugins, no_launcher):
    ds.training_args(load('deepspeed = "zero2"\n'), None)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "0",
        "1",
        "0",
    )
    assert int(os.environ["MASTER_PORT"]) > 0


def test_a_launcher_environment_is_left_alone(plugins, monkeypatch, no_launcher):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds.training_args(load('deepspeed = "zero2"\n'), None)
    assert os.environ["RANK"] == "1" and "MASTER_PORT" not in os.environ


def test_precision_and_batch_resolved_on_this_machine_must_agree(plugins, monkeypatch):
    import sft.model

    monkeypatch.setattr(sft.model, "cuda_available", lambda: False)
    bf16 = load("[deepspeed]\nzero_optimization = {stage = 2}\nbf16 = {enabled = true}\n")
    with pytest.raises(ConfigError, match=r"bf16\.enabled = true .* trains in float32 here"):
        ds.training_args(bf16, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    batch = load(
        "micro_batch_size = 2\n[deepspeed]\nzero_optimization = {stage = 2}\ntrain_batch_size = 2\n"
    )
    with pytest.raises(ConfigError, match="× 2 processes = 4"):
        ds.training_args(batch, None)


# -- real runs -----------------------------------------------------------------------------------

needs_engine = pytest.mark.skipif(
    not installed("deepspeed"),
    reason="deepspeed is not installed (pip install 'sft-train[deepspeed]')",
)

# SGD with a constant rate and no clipping: the update is exactly lr × gradient, so any
# difference in what the processes see or how their gradients are reduced shows.
EXACT = """
optimizer = "sgd"
lr_scheduler = "constant"
max_grad_norm = 0
shuffle_merged_datasets = false
max_steps = 3
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model, chat data and a config; `run(*args)` runs `sft run` in new processes."""
    from sft.plugins.chat_template.templates import builtin_template
    from sft.testing import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("deepspeed")
    tokenizer = build_tokenizer(
        chat_template=builtin_template("chatml"),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    build_model(tokenizer).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    write_jsonl(root / "data.jsonl", tiny_rows(16))
    body = TINY_CONFIG.replace("{tmp}", str(root)).replace("num_epochs = 1", EXACT)
    (root / "config.toml").write_text(body)

    # A fresh launch: no rank variables inherited from this process.
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}

    def run(name: str, *args: str) -> Path:
        out = root / name
        done = subprocess.run(
            [sys.executable, "-m", "sft", "run", str(root / "config.toml"), *args,
             "--set", f"output_dir={out}"],
            capture_output=True, text=True, timeout=900, env=environment,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return out

    run.root = root  # type: ignore[attr-defined]
    return run


def assert_same(first: Path, second: Path, base: Path, file: str = "model.safetensors") -> None:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(first / file), load_file(second / file)
    assert sorted(a) == sorted(b)
    if (base / file).exists():
        start = load_file(base / file)
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # training moved them
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def one_process(project):
    """The reference: no DeepSpeed, one process, the same global batch (2 × accumulation 2)."""
    return project("reference", "--set", "gradient_accumulation_steps=2")


@needs_engine
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_two_processes_save_the_weights_of_one(project, one_process, preset):
    # ZeRO-3 with activation checkpointing: the reentrant recomputation sft sets under DeepSpeed.
    extra = ["--set", "gradient_checkpointing=true"] if preset == "zero3" else []
    out = project(preset, "--nproc-per-node", "2", "--set", f"deepspeed={preset}", *extra)
    assert_same(one_process, out, project.root / "tiny")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it


@needs_engine
@pytest.mark.distributed
@pytest.mark.slow
def test_one_process_without_a_launcher_and_a_bare_table(project, one_process):
    # The table names no batch, accumulation or clipping: they follow sft's keys ("auto"), so
    # DeepSpeed accumulates 2 micro-batches as sft does (its own default is 1).
    bare = "deepspeed={zero_optimization = {stage = 2}}"
    out = project("single", "--set", bare, "--set", "gradient_accumulation_steps=2")
    assert_same(one_process, out, project.root / "tiny")


@needs_engine
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_offload_trains_a_lora_adapter_with_sft_optimizer_that_peft_loads(project):
    lora = [
        "--set",
        "adapter=lora",
        "--set",
        "lora_target_linear=true",
        "--set",
        "learning_rate=0.5",
    ]
    reference = project("lora-reference", *lora, "--set", "gradient_accumulation_steps=2")
    # SGD kept under optimizer offload (DeepSpeed would otherwise step Adam): same adapter.
    out = project(
        "lora-offload", *lora, "--nproc-per-node", "2", "--set", "deepspeed=zero3_offload"
    )
    assert_same(reference, out, project.root / "tiny", file="adapter_model.safetensors")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project.root / "tiny"), out)


@needs_engine
@pytest.mark.distributed
@pytest.mark.slow
def test_a_zero3_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(project, one_process):
    zero3 = ["--nproc-per-node", "2", "--set", "deepspeed=zero3", "--set", "save_steps=2"]
    project("resumed", *zero3, "--set", "max_steps=2")
    assert (project.root / "resumed" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own
    resume = ["--set", "auto_resume_from_checkpoints=true", "--set", "resume_allow_changes=true"]
    out = project("resumed", *zero3, *resume)  # max_steps 3, from checkpoint-2
    assert_same(one_process, out, project.root / "tiny")
