"""Trainer pass-throughs: each test fails if its key were accepted and ignored (the optimizer the
trainer built, the lr a schedule gives at a step, the noise added, the modules adapted, ...)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sft.errors import ConfigError

# -- optimizers -----------------------------------------------------------------------------------


def test_every_transformers_optimizer_name_is_registered(plugins):
    from transformers.training_args import OptimizerNames

    registered = set(plugins.optimizers().names())
    missing = {name.value for name in OptimizerNames} - registered
    assert not missing


def _tiny_model():
    from sft.testing import build_model, build_tokenizer

    return build_model(build_tokenizer(eos_token="</s>"), num_layers=1)


def _built(make_config, name: str, *overrides: str, model=None):
    from sft.manager import get_plugins
    from sft.train.trainer import build_optimizer

    config = make_config('[[datasets]]\npath = "x"\n', f"optimizer={name}", *overrides)
    model = model if model is not None else _tiny_model()
    spec = get_plugins().optimizers().get(name)
    return build_optimizer(spec, model, config), model


# Optimizers whose package is installed here (the dev extra) and that run on a CPU, with the
# class transformers' Trainer builds for the name.
CPU_OPTIMIZERS = {
    "rmsprop": (),
    "adagrad": (),
    "schedule_free_adamw": ("lr_scheduler=constant",),
    "schedule_free_radam": ("lr_scheduler=constant",),
    "schedule_free_sgd": ("lr_scheduler=constant",),
    "grokadamw": (),
    "stable_adamw": (),
    "galore_adamw": ("optim_target_modules=all_linear",),
    "galore_adafactor": ("optim_target_modules=all_linear",),
    "apollo_adamw": ("optim_target_modules=all_linear",),
}


@pytest.mark.parametrize("name", sorted(CPU_OPTIMIZERS))
def test_an_optimizer_name_builds_the_class_transformers_builds(make_config, name):
    import types

    from transformers import Trainer

    optimizer, model = _built(make_config, name, *CPU_OPTIMIZERS[name])
    args = types.SimpleNamespace(
        optim=name,
        optim_args=None,
        optim_target_modules="all-linear"
        if "optim_target_modules=all_linear" in CPU_OPTIMIZERS[name]
        else None,
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        gradient_accumulation_steps=1,
        parallel_mode=None,
    )
    from transformers.training_args import ParallelMode

    args.parallel_mode = ParallelMode.NOT_DISTRIBUTED
    expected, _ = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert isinstance(optimizer, expected)
    # One real step changes the weights.
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 50, (1, 8))
    getattr(optimizer, "train", lambda: None)()
    for _ in range(6):  # RAdam rectifies its first steps away
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_optim_args_reach_the_optimizer(make_config):
    optimizer, _ = _built(make_config, "rmsprop", "optim_args={momentum=0.5, alpha=0.9}")
    assert optimizer.defaults["momentum"] == 0.5 and optimizer.defaults["alpha"] == 0.9


def test_muon_orthogonalises_hidden_matrices_and_adamw_takes_the_rest(make_config):
    optimizer, model = _built(make_config, "muon")
    assert type(optimizer).__name__ == "MuonWithAdamW"
    embeddings = model.get_input_embeddings().weight
    muon = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    assert id(embeddings) not in muon
    assert any(p.ndim == 2 and id(p) in muon for p in model.parameters())


def test_lomo_trains_in_backward(tiny_project):
    from sft.train.run import train

    config = tiny_project("optimizer=lomo", "max_grad_norm=0", "max_steps=2")
    result = train(config)
    assert result.global_step == 2 and math.isfinite(result.train_loss)


def test_schedule_free_saves_its_averaged_weights(tiny_project):
    from sft.train.run import train

    config = tiny_project("optimizer=schedule_free_adamw", "lr_scheduler=constant", "max_steps=2")
    result = train(config)
    assert result.global_step == 2


def test_an_uninstalled_optimizer_package_is_a_machine_problem(make_config):
    with pytest.raises(ConfigError) as error:
        make_config('[[datasets]]\npath = "x"\n', "optimizer=adamw_anyprecision")
    (problem,) = [p for p in error.value.problems if p.path == "optimizer"]
    assert problem.machine and "torchdistx" in problem.message


# -- LoRA+ ------------------------------------------------------------------------------------------


def test_loraplus_gives_lora_b_the_ratio_times_the_learning_rate(tiny_project):
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer
    from sft.train.trainer import build_optimizer

    config = tiny_project(
        "adapter=lora", "lora_target_linear=true", "loraplus_lr_ratio=16", "learning_rate=0.001"
    )
    model = apply_adapter(load_model(config, load_tokenizer(config), get_plugins()), config)
    optimizer = build_optimizer(get_plugins().optimizers().get("adamw_torch"), model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind: dict[str, set[float]] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            kind = "lora_B" if "lora_B" in names[id(parameter)] else "other"
            by_kind.setdefault(kind, set()).add(round(group["lr"], 9))
    assert by_kind == {"other": {0.001}, "lora_B": {0.016}}


# -- schedules ------------------------------------------------------------------------------------


def _lrs(make_config, *overrides: str, total: int = 10, warmup: int = 2) -> list[float]:
    from sft.train.schedule import build_schedule

    config = make_config('[[datasets]]\npath = "x"\n', "learning_rate=1.0", *overrides)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = build_schedule(config, optimizer, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_linear_and_constant_schedules(make_config):
    assert _lrs(make_config, "lr_scheduler=linear")[:3] == [0.0, 0.5, 1.0]
    assert _lrs(make_config, "lr_scheduler=linear")[6] == pytest.approx(0.5)
    assert set(_lrs(make_config, "lr_scheduler=constant", "warmup_steps=0", total=5)) == {1.0}


def test_cosine_with_min_lr_ends_at_its_floor(make_config):
    lrs = _lrs(make_config, "lr_scheduler=cosine_with_min_lr", "cosine_min_lr_ratio=0.1")
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    plain = _lrs(make_config, "lr_scheduler=cosine")
    assert plain[-1] == pytest.approx(0.0, abs=1e-9)
    floored = _lrs(make_config, "lr_scheduler=cosine", "cosine_min_lr_ratio=0.2")
    assert floored[-1] == pytest.approx(0.2)


def test_warmup_stable_decay_holds_then_decays(make_config):
    lrs = _lrs(
        make_config, "lr_scheduler=warmup_stable_decay", "lr_scheduler_kwargs={num_decay_steps=4}"
    )
    assert lrs[2:7] == pytest.approx([1.0] * 5)  # stable until the last 4 steps
    assert lrs[7] < 1.0 and lrs[10] == pytest.approx(0.0, abs=1e-6)


def test_rex_follows_its_formula(make_config):
    lrs = _lrs(make_config, "lr_scheduler=rex")
    z = 1 - (6 - 2) / 8  # step 6: half of the decay done
    assert lrs[6] == pytest.approx(z / (0.1 + 0.9 * z))
    assert lrs[1] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.0)


def test_one_cycle_peaks_after_warmup_and_starts_at_lr_over_div_factor(make_config):
    lrs = _lrs(make_config, "lr_scheduler=one_cycle", "lr_div_factor=10", "warmup_steps=2")
    assert lrs[0] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(1.0, rel=1e-3) and lrs.index(max(lrs)) in (1, 2)


def test_polynomial_and_inverse_sqrt_take_their_options(make_config):
    lrs = _lrs(
        make_config, "lr_scheduler=polynomial", "lr_scheduler_kwargs={lr_end=0.5, power=1.0}"
    )
    assert lrs[-1] == pytest.approx(0.5)
    lrs = _lrs(make_config, "lr_scheduler=inverse_sqrt", "lr_scheduler_kwargs={timescale=4}")
    assert lrs[6] == pytest.approx(1 / math.sqrt((6 - 2 + 4) / 4))


def test_a_schedule_option_of_another_schedule_is_an_error(make_config):
    with pytest.raises(ConfigError, match="is not an option of lr_scheduler 'linear'"):
        make_config(
            '[[datasets]]\npath = "x"\n', "lr_scheduler=linear", "lr_scheduler_kwargs={power=2}"
        )


# -- NEFTune, RoPE scaling, compile, offloading, LoRA regex, watchdog -----------------------------


def test_neftune_adds_noise_to_the_embeddings_while_training(tiny_project):
    from transformers import TrainerCallback

    from sft.train.run import train

    seen: list[float] = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            embeddings = model.get_input_embeddings()

            def hook(module, inputs, output):
                clean = torch.nn.functional.embedding(inputs[0], module.weight)
                seen.append(float((output - clean).abs().max()))

            embeddings.register_forward_hook(hook)

    import sft.manager as manager

    plugins = manager.get_plugins()
    original = plugins.trainer_callbacks
    plugins.trainer_callbacks = lambda config: [*original(config), Probe()]
    try:
        train(tiny_project("neftune_noise_alpha=5", "max_steps=1"))
        assert seen and max(seen) > 0
        seen.clear()
        train(tiny_project("max_steps=1", f"output_dir={tiny_project.tmp_path / 'out2'}"))
        assert seen and max(seen) == 0
    finally:
        plugins.trainer_callbacks = original


def test_rope_scaling_is_set_on_the_model_and_keeps_rope_theta(tiny_project):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("rope_scaling={type = 'linear', factor = 2.0}")
    model = load_model(config, load_tokenizer(config), get_plugins())
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    assert rope["rope_theta"] == 10000.0


def test_torch_compile_and_neftune_reach_the_training_arguments(tiny_project):
    from sft.train.run import training_arguments

    config = tiny_project("torch_compile_backend=aot_eager", "neftune_noise_alpha=3")
    args = training_arguments(config, 24, False, torch.float32)
    assert args.torch_compile and args.torch_compile_backend == "aot_eager"
    assert args.neftune_noise_alpha == 3


def test_activation_offloading_needs_checkpointing_and_a_gpu(make_config):
    with pytest.raises(ConfigError) as error:
        make_config('[[datasets]]\npath = "x"\n', "activation_offloading=true")
    messages = [p.message for p in error.value.problems if p.path == "activation_offloading"]
    assert any("gradient_checkpointing is off" in m for m in messages)
    assert any("without a CUDA GPU" in m for m in messages)


def test_a_lora_target_regex_adapts_only_the_matching_modules(tiny_project):
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("adapter=lora", r"lora_target_modules=.*layers\.0\.self_attn\.q_proj")
    model = apply_adapter(load_model(config, load_tokenizer(config), get_plugins()), config)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 1 and adapted.pop().endswith("layers.0.self_attn.q_proj")


def test_an_invalid_lora_target_regex_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="invalid regex"):
        make_config('[[datasets]]\npath = "x"\n', "adapter=lora", "lora_target_modules=(q_proj")


def test_the_loss_watchdog_stops_a_run_and_saves_no_model(tiny_project):
    from sft.train.monitor import LossDiverged
    from sft.train.run import train

    config = tiny_project("loss_watchdog_threshold=0.001", "loss_watchdog_patience=2")
    with pytest.raises(LossDiverged, match="stopped at step 2/") as error:
        train(config)
    assert "without saving the diverged model" in str(error.value)
    saved = [p.name for p in Path(config.output_dir).glob("*.safetensors")]
    assert saved == []


# -- saving, DDP, MoE experts, offloading: Axolotl keys passed on ---------------------------------


def test_save_strategy_and_save_only_model_reach_the_training_arguments(tiny_project):
    from sft.train.run import training_arguments

    def args(*overrides: str):
        return training_arguments(tiny_project(*overrides), 24, False, torch.float32)

    assert args("save_strategy=no").save_strategy == "no"
    assert args("save_strategy=epoch").save_strategy == "epoch"
    steps = args("save_strategy=steps")
    assert steps.save_strategy == "steps" and steps.save_steps == 500
    assert args("save_strategy=steps", "save_steps=7").save_steps == 7
    assert args("save_only_model=true").save_only_model
    assert not args().save_only_model
    assert args("ddp_find_unused_parameters=true").ddp_find_unused_parameters
    assert args().ddp_find_unused_parameters is False


def test_save_strategy_conflicts_and_save_only_model_with_resume_are_errors(make_config):
    with pytest.raises(ConfigError) as error:
        make_config(
            '[[datasets]]\npath = "x"\n',
            "save_strategy=no",
            "save_steps=5",
            "save_only_model=true",
            "auto_resume_from_checkpoints=true",
            machine_checks=False,
        )
    paths = {p.path for p in error.value.problems}
    assert {"save_steps", "save_only_model"} <= paths


def test_a_run_with_save_strategy_no_writes_no_checkpoint(tiny_project):
    from sft.train.run import train

    config = tiny_project("save_strategy=no", "max_steps=2")
    train(config)
    assert not list(Path(config.output_dir).glob("checkpoint-*"))
    assert list(Path(config.output_dir).glob("*.safetensors"))


def test_save_strategy_best_saves_exactly_at_the_evaluations_that_improve(tiny_project):
    import json

    from sft.train.run import train

    # lr 0.1 on a tiny model: the eval loss improves at steps 1 and 2, then never again
    config = tiny_project(
        "save_strategy=best",
        "val_set_size=0.25",
        "eval_steps=1",
        "max_steps=8",
        "learning_rate=0.1",
        "lr_scheduler=constant",
    )
    train(config)
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").open()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert len(evals) == 8
    improving, best = [], float("inf")
    for step, loss in evals:
        if loss < best:
            improving.append(step)
            best = loss
    assert 1 < len(improving) < 8  # the test shows both kinds of evaluation
    saved = sorted(int(p.name.split("-")[1]) for p in Path(config.output_dir).glob("checkpoint-*"))
    assert saved == improving


def test_save_strategy_best_needs_an_eval_set_and_refuses_a_save_interval(make_config):
    with pytest.raises(ConfigError) as error:
        make_config(
            '[[datasets]]\npath = "x"\n', "save_strategy=best", "save_steps=5", machine_checks=False
        )
    problems = {p.path: p.message for p in error.value.problems}
    assert "no eval set" in problems["save_strategy"]
    assert "conflicts with save_strategy = 'best'" in problems["save_steps"]


def test_experts_implementation_reaches_the_model_config(tiny_project):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("experts_implementation=batched_mm")
    model = load_model(config, load_tokenizer(config), get_plugins())
    assert model.config._experts_implementation == "batched_mm"


def test_the_experts_implementations_are_those_of_transformers():
    import typing

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from sft.config.schema import Config

    hint = typing.get_type_hints(Config)["experts_implementation"]
    (literal, _) = typing.get_args(hint)
    # plus Axolotl's scattermoe, which runs as transformers' default (a warning)
    assert set(typing.get_args(literal)) == {"eager", "scattermoe", *ALL_EXPERTS_FUNCTIONS}


def test_axolotls_scattermoe_runs_as_the_default_experts_implementation(tiny_project, tiny_moe):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project(f"base_model={tiny_moe}", "experts_implementation=scattermoe")
    (warning,) = [w for w in config.warnings if w.path == "experts_implementation"]
    assert "transformers' default implementation" in warning.message
    default = tiny_project(f"base_model={tiny_moe}")
    tokenizer = load_tokenizer(config)
    loaded = load_model(config, tokenizer, get_plugins()).config._experts_implementation
    assert loaded == load_model(default, tokenizer, get_plugins()).config._experts_implementation


def test_gradient_checkpointing_offload_is_activation_offloading(make_config):
    with pytest.raises(ConfigError) as error:
        make_config('[[datasets]]\npath = "x"\n', "gradient_checkpointing=offload")
    (problem,) = [p for p in error.value.problems if p.path == "gradient_checkpointing"]
    assert problem.machine and "without a CUDA GPU" in problem.message
    config = make_config(
        '[[datasets]]\npath = "x"\n', "gradient_checkpointing=offload", machine_checks=False
    )
    assert config.offloads_activations and config.gradient_checkpointing == "offload"


def test_activation_offloading_legacy_is_read_as_true(make_config):
    dataset = '[[datasets]]\npath = "x"\n'
    legacy = make_config(
        dataset,
        "activation_offloading=legacy",
        "gradient_checkpointing=true",
        machine_checks=False,
    )
    assert legacy.offloads_activations
    for value in ("legacy", "true"):
        with pytest.raises(ConfigError) as error:
            make_config(dataset, f"activation_offloading={value}", "gradient_checkpointing=true")
        (problem,) = error.value.problems
        assert problem.machine and "without a CUDA GPU" in problem.message


def test_batch_size_sets_gradient_accumulation(make_config):
    dataset = '[[datasets]]\npath = "x"\n'
    config = make_config(dataset, "micro_batch_size=2", "batch_size=8", machine_checks=False)
    assert config.gradient_accumulation_steps == 4
    for overrides, message in (
        (("micro_batch_size=3", "batch_size=8"), "not a multiple of micro_batch_size = 3"),
        (("batch_size=8", "gradient_accumulation_steps=2"), "conflicts with gradient_accumulation"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_config(dataset, *overrides, machine_checks=False)


def test_model_config_values_are_set_before_the_model_loads(tiny_project):
    from sft.errors import ModelError
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project("model_config={rms_norm_eps = 0.001}")
    model = load_model(config, load_tokenizer(config), get_plugins())
    assert model.config.rms_norm_eps == 0.001
    config = tiny_project("model_config={rms_norm_epz = 0.001}")
    with pytest.raises(ModelError, match=r"model_config\.rms_norm_epz: LlamaConfig has no field"):
        load_model(config, load_tokenizer(config), get_plugins())


def test_resize_token_embeddings_to_32x_rounds_the_new_vocabulary_up(tiny_project):
    from sft.manager import get_plugins
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    def rows(*overrides: str) -> tuple[int, int]:
        config = tiny_project("tokens=['<a>', '<b>', '<c>']", *overrides)
        tokenizer = load_tokenizer(config)
        model = load_model(config, tokenizer, get_plugins())
        return len(tokenizer), model.get_input_embeddings().weight.shape[0]

    vocabulary, plain = rows()
    assert plain == vocabulary
    _, padded = rows("resize_token_embeddings_to_32x=true")
    assert padded % 32 == 0 and vocabulary <= padded < vocabulary + 32


def test_dataloader_drop_last_reaches_the_training_arguments(tiny_project):
    from sft.train.run import training_arguments

    config = tiny_project("dataloader_drop_last=true")
    assert training_arguments(config, 24, False, torch.float32).dataloader_drop_last


def test_lora_target_parameters_adapts_fused_moe_expert_weights(tiny_project, tiny_moe):
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_project())
    config = tiny_project(
        f"base_model={tiny_moe}",
        "adapter=lora",
        "lora_target_modules=[q_proj]",
        "lora_target_parameters=['mlp.experts.gate_up_proj']",
    )
    model = apply_adapter(load_model(config, tokenizer, get_plugins()), config)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora_A" in n for n in trained)
    assert any("q_proj.lora_A" in n for n in trained)
    ids = torch.randint(0, len(tokenizer), (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    expert_lora = [p for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert expert_lora and all(p.grad is not None for p in expert_lora)


def test_tokenizer_legacy_reaches_the_tokenizer(tiny_project, monkeypatch):
    from sft.tokenizer import load_tokenizer

    cache = tiny_project.tmp_path / "sft-cache"
    monkeypatch.setenv("SFT_CACHE", str(cache))
    assert load_tokenizer(tiny_project("tokenizer_legacy=false")).init_kwargs["legacy"] is False
    assert "legacy" not in load_tokenizer(tiny_project()).init_kwargs
    assert not cache.exists()  # not a GGUF model: nothing is converted or cached


def test_loraplus_lr_embedding_sets_the_lr_of_lora_on_embeddings(tiny_project):
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer
    from sft.train.trainer import build_optimizer

    config = tiny_project(
        "adapter=lora",
        "lora_target_modules=[embed_tokens, q_proj]",
        "loraplus_lr_ratio=16",
        "loraplus_lr_embedding=0.00001",
        "learning_rate=0.001",
    )
    model = apply_adapter(load_model(config, load_tokenizer(config), get_plugins()), config)
    optimizer = build_optimizer(get_plugins().optimizers().get("adamw_torch"), model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    embedding_lrs = {
        group["lr"]
        for group in optimizer.param_groups
        for p in group["params"]
        if "lora_embedding" in names[id(p)]
    }
    assert embedding_lrs == {0.00001}


def test_torch_compile_mode_reaches_the_training_arguments(tiny_project):
    from sft.train.run import training_arguments

    args = training_arguments(
        tiny_project("torch_compile_mode=max-autotune"), 24, False, torch.float32
    )
    assert args.torch_compile and args.torch_compile_mode == "max-autotune"


def _train_sampler(tiny_project, *overrides):
    """The Trainer's sampler over the prepared data of `tiny_project(micro_batch_size=1, ...)`,
    with the config, tokenizer and prepared data."""
    from transformers import AutoModelForCausalLM, Trainer

    from sft.data.pipeline import prepare_datasets
    from sft.manager import get_plugins
    from sft.tokenizer import load_tokenizer
    from sft.train.run import training_arguments

    config = tiny_project("micro_batch_size=1", *overrides)
    tokenizer = load_tokenizer(config)
    prepared = prepare_datasets(config, tokenizer, get_plugins(), show_progress=False)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(config.base_model),
        args=training_arguments(config, len(prepared.train), False, torch.float32),
        train_dataset=prepared.train,
        processing_class=tokenizer,
    )
    return trainer._get_train_sampler(), config, tokenizer, prepared


def test_group_by_length_batches_unpacked_samples_of_similar_length(tiny_project):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert not isinstance(_train_sampler(tiny_project)[0], LengthGroupedSampler)
    sampler, _, _, prepared = _train_sampler(tiny_project, "group_by_length=true")
    data = prepared.train
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(len(data)))
    lengths = [len(data[i]["input_ids"]) for i in order]
    # 24 samples, batches of 1: megabatches of 6 (24 // 4), each sorted longest first
    for start in range(0, len(lengths), 6):
        group = lengths[start : start + 6]
        assert group == sorted(group, reverse=True), lengths
    assert lengths != sorted(lengths, reverse=True)  # still shuffled across megabatches


def test_group_by_length_with_packing_is_a_warning(tiny_project):
    config = tiny_project("group_by_length=true", "sample_packing=true")
    (warning,) = [w for w in config.warnings if w.path == "group_by_length"]
    assert "no effect with sample_packing = true" in warning.message


def test_curriculum_sampling_trains_in_dataset_order(tiny_project):
    """Axolotl's curriculum_sampling: the prepared samples keep file order, the Trainer draws
    them sequentially, and packing fills bins in that order."""
    from sft.data.packing import pack_dataset
    from sft.manager import get_plugins

    sampler, config, tokenizer, prepared = _train_sampler(tiny_project, "curriculum_sampling=true")
    rows = [prepared.train[i]["input_ids"] for i in sampler]
    assert len(rows) == 24  # tiny_rows: row i asks "What is i plus i?"
    for i, ids in enumerate(rows):
        assert f"What is {i} plus {i}?" in tokenizer.decode(ids)
    sampler, _, _, shuffled_data = _train_sampler(tiny_project)
    shuffled = [shuffled_data.train[i]["input_ids"] for i in sampler]
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, rows)) and shuffled != rows

    packed, _ = pack_dataset(prepared.train, 64, config, get_plugins())
    assert [i for one_bin in packed.bins for i in one_bin] == list(range(len(prepared.train)))
    by_length, _ = pack_dataset(
        prepared.train, 64, tiny_project("micro_batch_size=1"), get_plugins()
    )
    assert [i for one_bin in by_length.bins for i in one_bin] != list(range(len(prepared.train)))


def test_curriculum_sampling_conflicts_with_group_by_length(make_config):
    with pytest.raises(
        ConfigError, match=r"group_by_length \(--set\): conflicts with curriculum_sampling"
    ):
        make_config(
            '[[datasets]]\npath = "x"\n', "curriculum_sampling=true", "group_by_length=true"
        )


# A learning rate so high that the eval loss moves up and down: evaluations and checkpoints
# every step, stopping after 2 evaluations without improvement.
UNSTABLE_EARLY_STOPPING = (
    "val_set_size=0.25",
    "learning_rate=3.0",
    "optimizer=sgd",
    "lr_scheduler=constant",
    "eval_steps=1",
    "save_steps=1",
    "early_stopping_patience=2",
    "max_steps=12",
)


def test_early_stopping_stops_and_ends_with_the_best_checkpoint(tiny_project):
    """A learning rate so high the eval loss gets worse after the first evaluation: training
    stops `patience` evaluations later, and the final model is the best checkpoint's."""
    import json

    from safetensors.torch import load_file

    from sft.train.run import train

    config = tiny_project(*UNSTABLE_EARLY_STOPPING)
    result = train(config)
    out = Path(config.output_dir)
    states = {
        int(p.name.split("-")[1]): json.loads((p / "trainer_state.json").read_text())
        for p in out.glob("checkpoint-*")
    }
    last = max(states)
    history = [e for e in states[last]["log_history"] if "eval_loss" in e]
    losses = [e["eval_loss"] for e in history]
    best_step = history[losses.index(min(losses))]["step"]
    assert result.global_step < 12  # stopped early
    assert result.global_step == best_step + 2  # two evaluations without improvement
    best = states[last]["best_model_checkpoint"]
    assert best == str(out / f"checkpoint-{best_step}")  # not the staging directory
    final = load_file(out / "model.safetensors")
    kept = load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    assert all(torch.equal(final[name], kept[name]) for name in final)


def test_best_model_keys_need_an_eval_set_and_aligned_checkpoints(tiny_project):
    with pytest.raises(ConfigError, match="there is no eval set"):
        tiny_project("early_stopping_patience=2")
    with pytest.raises(ConfigError, match="3 is not a multiple of eval_steps"):
        tiny_project(
            "val_set_size=0.25", "load_best_model_at_end=true", "eval_steps=2", "save_steps=3"
        )
    config = tiny_project("metric_for_best_model=loss")
    assert [w.path for w in config.warnings] == ["metric_for_best_model"]


def test_cosine_constant_lr_ratio_holds_the_floor_from_that_fraction(make_config):
    from sft.train.schedule import build_schedule

    config = make_config(
        '[[datasets]]\npath = "x"\n',
        "lr_scheduler=cosine",
        "cosine_min_lr_ratio=0.1",
        "cosine_constant_lr_ratio=0.6",
        "learning_rate=1.0",
        machine_checks=False,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_schedule(config, optimizer, total=10, warmup=2)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # warmup 0, 0.5; cosine from 1 (step 2) to the floor 0.1 at step int(10 * 0.6) = 6; then 0.1
    expected = [0.0, 0.5] + [
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)
    ]
    expected += [0.1] * 5
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("floor", [None, 0.1])
def test_lr_quadratic_warmup_ramps_along_the_square(make_config, floor):
    from sft.train.schedule import build_schedule

    config = make_config(
        '[[datasets]]\npath = "x"\n',
        "lr_quadratic_warmup=true",
        "learning_rate=1.0",
        *([f"cosine_min_lr_ratio={floor}"] if floor else []),
        machine_checks=False,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_schedule(config, optimizer, total=10, warmup=4)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    low = floor or 0.0
    expected = [(s / 4) ** 2 for s in range(4)] + [
        low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)
    ]
    assert lrs == pytest.approx(expected)
    linear = make_config(
        '[[datasets]]\npath = "x"\n',
        "lr_quadratic_warmup=true",
        "lr_scheduler=linear",
        machine_checks=False,
    )
    assert [w.path for w in linear.warnings] == ["lr_quadratic_warmup"]


def test_cosine_constant_lr_ratio_without_its_cosine_floor_is_a_warning(make_config):
    config = make_config(
        '[[datasets]]\npath = "x"\n',
        "lr_scheduler=linear",
        "cosine_constant_lr_ratio=0.5",
        machine_checks=False,
    )
    assert [w.path for w in config.warnings] == ["cosine_constant_lr_ratio"]
    zero = make_config(
        '[[datasets]]\npath = "x"\n', "cosine_constant_lr_ratio=0", machine_checks=False
    )
    assert zero.warnings == ()  # 0 is "off", as in Axolotl


def test_greater_is_better_and_metric_for_best_model_decide_the_best_checkpoint(tiny_project):
    """The same kind of unstable run with greater_is_better = true: the best checkpoint is the
    one with the highest eval loss, and the run stops two evaluations after it."""
    import json

    from sft.train.run import train

    config = tiny_project(
        *UNSTABLE_EARLY_STOPPING, "metric_for_best_model=eval_loss", "greater_is_better=true"
    )
    result = train(config)
    out = Path(config.output_dir)
    last = json.loads((out / f"checkpoint-{result.global_step}" / "trainer_state.json").read_text())
    history = [e for e in last["log_history"] if "eval_loss" in e]
    losses = [e["eval_loss"] for e in history]
    best_step = history[losses.index(max(losses))]["step"]  # max: larger is better here
    assert losses.index(max(losses)) != losses.index(min(losses))  # the test tells them apart
    assert last["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert result.global_step == min(best_step + 2, 12)


def test_float16_trains_in_pure_float16_without_a_loss_scaler(tiny_project):
    import torch
    from safetensors.torch import load_file

    from sft.errors import ConfigError
    from sft.model import resolve_dtype
    from sft.train.run import train, training_arguments

    config = tiny_project("float16=true", "max_steps=2")
    assert resolve_dtype(config) is torch.float16
    args = training_arguments(config, 8, False, torch.float16)
    assert not args.fp16 and not args.bf16  # no autocast, no GradScaler
    result = train(config)
    assert result.global_step == 2 and result.train_loss == result.train_loss  # not NaN
    saved = load_file(result.output_dir / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    base = load_file(tiny_project.tmp_path / "tiny" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved[name].float(), base[name].half().float())  # it trained
    with pytest.raises(ConfigError, match="float16 trains in pure float16"):
        tiny_project("float16=true", "bf16=true")


# -- reinit_weights: the architecture with fresh weights ------------------------------------------


def test_reinit_weights_builds_seeded_random_weights_of_the_same_architecture(tiny_project):
    from sft.model import load_model
    from sft.tokenizer import load_tokenizer

    def weights(*overrides: str) -> dict[str, torch.Tensor]:
        config = tiny_project(*overrides)
        model = load_model(config, load_tokenizer(config), config.plugin_set)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    trained = weights()
    fresh, again, other_seed = (
        weights("reinit_weights=true"),
        weights("reinit_weights=true"),
        weights("reinit_weights=true", "seed=4"),
    )
    assert fresh.keys() == trained.keys()
    assert all(fresh[n].shape == trained[n].shape for n in fresh)
    projections = [n for n in fresh if n.endswith("q_proj.weight")]
    assert projections and not any(torch.equal(fresh[n], trained[n]) for n in projections)
    assert all(torch.equal(fresh[n], again[n]) for n in fresh)  # seeded: every rank the same
    assert not all(torch.equal(fresh[n], other_seed[n]) for n in projections)


def test_reinit_weights_trains_a_full_model_and_refuses_adapters_and_quantization(
    tiny_project, make_config
):
    from sft.train.run import train

    result = train(tiny_project("reinit_weights=true", "max_steps=2"))
    assert result.global_step == 2 and (result.output_dir / "model.safetensors").exists()
    with pytest.raises(ConfigError) as error:
        make_config(
            '[[datasets]]\npath = "x"\n',
            "reinit_weights=true",
            "adapter=qlora",
            "load_in_4bit=true",
            machine_checks=False,
        )
    problems = {p.path: p.message for p in error.value.problems}
    assert "reinit_weights" in problems["adapter"] and "reinit_weights" in problems["load_in_4bit"]
