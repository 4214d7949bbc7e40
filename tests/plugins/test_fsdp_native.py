"""Axolotl's parallelism sizes: dp_shard_size / dp_replicate_size on accelerate's FSDP2 (its
ParallelismConfig), expert_parallel_size on transformers' native sharded loading. The keys, their
checks, and real multi-process runs on CPU (gloo) that save what 1 process saves: accelerate's
FSDP2 through tests/plugins/fsdp_cpu.py (accelerate gates FSDP to GPUs), transformers' native
sharding as it is (it runs on CPUs)."""

from __future__ import annotations

import pytest

# the 2-process harness and weight comparisons of the fsdp plugin's tests
from test_fsdp import SHARDED, SHARED, _assert_same_weights, _config, _launch, _weights

from sft.errors import ConfigError, ModelError
from sft.plugins.fsdp import native, native_selected, selected


def _problems(plugins, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        _config(plugins, text)
    return {p.path: p.message for p in caught.value.problems}


@pytest.mark.parametrize(
    ("text", "native_on", "accelerate_on"),
    [
        ("dp_shard_size = 2", False, True),
        ("dp_replicate_size = 2\ndp_shard_size = 2", False, True),
        ("expert_parallel_size = 2", True, False),
        # sizes of 1 are no parallelism (Axolotl's examples write them so)
        ("dp_shard_size = 1\ndp_replicate_size = 1", False, False),
        ("dp_shard_size = 1\ndp_replicate_size = 1\nfsdp_version = 2", False, True),
        # expert parallelism takes the fsdp keys with it: one engine, transformers' native one
        ("expert_parallel_size = 2\nfsdp_version = 2\n[fsdp_config]\noffload_params = true", True,
         False),
    ],
)  # fmt: skip
def test_the_sizes_select_the_engine(plugins, text, native_on, accelerate_on):
    config = _config(plugins, text)
    assert native_selected(config) is native_on
    assert selected(config) is accelerate_on


def test_what_expert_parallelism_cannot_do_is_refused(plugins):
    problems = _problems(
        plugins,
        "dp_shard_size = 4\nexpert_parallel_size = 3\nload_in_4bit = true\nadapter = 'qlora'\n"
        "optimizer = 'adamw_bnb_8bit'\nload_best_model_at_end = true\nfsdp_version = 2\n"
        "[fsdp_config]\nreshard_after_forward = false\nauto_wrap_policy = 'SIZE_BASED_WRAP'\n"
        "min_num_params = 1000\nstate_dict_type = 'SHARDED_STATE_DICT'",
    )
    assert "cannot be sharded by transformers' FSDP2" in problems["load_in_4bit"]
    assert "must divide dp_shard_size (4)" in problems["expert_parallel_size"]
    assert "not supported with transformers' native sharding" in problems["optimizer"]
    assert "keeps no optimizer state" in problems["load_best_model_at_end"]
    assert "false is not available" in problems["fsdp_config.reshard_after_forward"]
    assert "by the model's own plan" in problems["fsdp_config.auto_wrap_policy"]
    assert "writes full model checkpoints" in problems["fsdp_config.state_dict_type"]
    # what it does to checkpoints is said up front
    (warning,) = _config(plugins, "expert_parallel_size = 2").warnings
    assert warning.path == "expert_parallel_size" and "cannot resume" in warning.message
    said = _config(
        plugins, "expert_parallel_size = 2\n[fsdp_config]\ncpu_ram_efficient_loading = true"
    ).warnings
    assert [w.path for w in said] == [
        "expert_parallel_size",
        "fsdp_config.cpu_ram_efficient_loading",
    ]


def test_fsdp1_cannot_take_the_shard_sizes(plugins):
    problems = _problems(plugins, "dp_shard_size = 2\nfsdp_version = 1")
    assert "FSDP1 cannot" in problems["fsdp_version"]


def test_sizes_must_fill_the_processes(plugins):
    keys = native.ParallelKeys(dp_shard_size=2, dp_replicate_size=2)
    assert native.sizes(keys, 4) == {"fsdp_size": 2, "dp_replicate_size": 2, "tp_size": 1}
    assert native.sizes(native.ParallelKeys(dp_replicate_size=2), 4)["fsdp_size"] == 2
    assert native.sizes(native.ParallelKeys(expert_parallel_size=2), 2)["ep_size"] == 2
    with pytest.raises(ModelError, match=r"= 4 processes, but this run has 2"):
        native.sizes(keys, 2)
    with pytest.raises(ModelError, match="must divide the FSDP2 shard group"):
        native.sizes(native.ParallelKeys(expert_parallel_size=2), 3)


def test_an_unsharded_model_is_not_taken_for_expert_parallel(tiny_moe):
    # the guard of the native engine: a model transformers loaded without splitting its
    # experts (on several processes, a MoE class without an expert plan) is refused before
    # training; sharded expert weights are DTensors split on dim 0 (the 2-process run below)
    from transformers import AutoModelForCausalLM

    assert not native.experts_sharded(AutoModelForCausalLM.from_pretrained(tiny_moe))


def test_parallelism_config_for_accelerate(plugins):
    config = native.parallelism_config(native.ParallelKeys(dp_replicate_size=2), 4)
    assert (config.dp_replicate_size, config.dp_shard_size) == (2, 2)
    with pytest.raises(ModelError, match="plain data parallelism"):
        native.parallelism_config(native.ParallelKeys(dp_replicate_size=2, dp_shard_size=1), 2)


def test_one_plain_process_is_told_to_launch_several(plugins, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ModelError, match="started as one plain process"):
        native.distributed_config(native.ParallelKeys(expert_parallel_size=2), None)


# -- real runs: 2 processes against 1 -------------------------------------------------------------


def _run_both(tiny_project, keys: tuple[str, ...], sizes: tuple[str, ...], processes: int = 2,
              harness: bool = True, base: str | None = None):  # fmt: skip
    """The same global batch: 1 plain process (micro batch = processes), then `processes`
    processes (micro batch 1 each) with the parallelism sizes."""
    from conftest import TINY_CONFIG

    from sft.train.run import train

    tmp = tiny_project.tmp_path
    model = (f"base_model={base}",) if base else ()
    keys = (*SHARED, *model, f"dataset_prepared_path={tmp}/prepared", *keys)
    train(tiny_project(f"output_dir={tmp}/one", f"micro_batch_size={processes}", *keys))
    path = tmp / "parallel.toml"
    path.write_text(TINY_CONFIG.replace("{tmp}", str(tmp)))
    many = (*keys, f"output_dir={tmp}/many", "micro_batch_size=1", *sizes)
    return tmp / "one", tmp / "many", _launch(path, list(many), processes, harness)


@pytest.mark.distributed
@pytest.mark.slow
def test_hsdp_two_replicas_of_two_shards_saves_what_one_process_saves(tiny_project):
    # dp_shard_size alone is the same engine with one replica (accelerate's FSDP2, as the fsdp
    # tests run it): the replicas are what this adds
    keys = ("adapter=lora", "lora_target_linear=true")
    one, many, output = _run_both(
        tiny_project, keys, ("dp_replicate_size=2", "dp_shard_size=2"), processes=4
    )
    assert "engine: fsdp, 4 processes" in output and SHARDED.search(output), output[-3000:]
    _assert_same_weights(
        _weights(many / "adapter_model.safetensors"), _weights(one / "adapter_model.safetensors")
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_moe_saves_what_one_process_saves(tiny_project, tiny_moe):
    one, many, output = _run_both(
        tiny_project, (), ("expert_parallel_size=2",), harness=False, base=str(tiny_moe)
    )
    assert "engine: fsdp2_native, 2 processes" in output, output[-3000:]
    base = _weights(tiny_moe / "model.safetensors")
    _assert_same_weights(
        _weights(many / "model.safetensors"), _weights(one / "model.safetensors"), base
    )
