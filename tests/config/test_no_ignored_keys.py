"""No key is accepted and ignored: a key that would change nothing is an error, or a warning
that names it and says why (shown by `sft validate` and `sft run`), or it works."""

from __future__ import annotations

import json

import pytest

from sft.errors import ConfigError

DATA = '[[datasets]]\npath = "org/data"\ntype = "alpaca"\n'
DATA_YAML = "datasets:\n  - path: org/data\n    type: alpaca\n"


def problems_of(make_config, text: str, *overrides: str) -> list:
    with pytest.raises(ConfigError) as caught:
        make_config(text, *overrides)
    return caught.value.problems


def only(problems: list, path: str):
    found = [p for p in problems if p.path == path]
    assert len(found) == 1, [p.render() for p in problems]
    return found[0]


# -- LoRA keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "lora_r = 16",
        "lora_alpha = 32",
        "lora_dropout = 0.05",
        "lora_target_modules = ['q_proj']",
        "lora_target_linear = true",
        "lora_modules_to_save = ['lm_head']",
        "peft_use_dora = true",
        "peft_use_rslora = true",
    ],
)
def test_a_lora_key_without_an_adapter_is_an_error_not_a_silent_full_finetune(make_config, setting):
    name = setting.split(" =")[0]
    problem = only(problems_of(make_config, f"{setting}\n{DATA}"), name)
    assert "has no effect: no adapter is set" in problem.message
    assert problem.line == 2 and "adapter = 'lora'" in problem.hint
    make_config(f"adapter = 'lora'\n{setting}\n{DATA}")  # with the adapter: fine


def test_lora_keys_beside_a_blank_adapter_warn_that_the_run_is_a_full_finetune(plugins):
    # `adapter:` written blank (Axolotl's full fine-tune examples) chooses no adapter: the LoRA
    # keys left beside it are said to do nothing, and the config loads as a full fine-tune.
    from sft.config import load_config_text

    text = f"base_model: m\nadapter:\nlora_r: 16\nlora_target_linear: true\n{DATA_YAML}"
    config = load_config_text(text, "yaml", machine_checks=False)
    assert config.adapter is None
    said = {w.path: w.message for w in config.warnings}
    assert said == {
        "lora_r": "has no effect: adapter is blank, so this is a full fine-tune",
        "lora_target_linear": "has no effect: adapter is blank, so this is a full fine-tune",
    }
    with pytest.raises(ConfigError, match="no adapter is set"):  # no adapter key at all
        load_config_text(text.replace("adapter:\n", ""), "yaml", machine_checks=False)


def test_lora_keys_left_at_their_defaults_or_blank_are_not_set(make_config):
    config = make_config(f"lora_r = 8\nlora_alpha = 16\nlora_target_modules = []\n{DATA}")
    assert config.adapter is None and config.warnings == ()


def saved_adapter(tmp_path, **fields):
    directory = tmp_path / "adapter"
    directory.mkdir()
    saved = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps({**saved, **fields}))
    return directory


def test_lora_keys_beside_lora_model_dir_that_the_saved_adapter_overrides_are_errors(
    make_config,
):
    adapter = saved_adapter(make_config.tmp_path)
    head = f'adapter = "lora"\nlora_model_dir = "{adapter}"\n'
    problems = problems_of(make_config, f"{head}lora_r = 32\nlora_alpha = 32\n{DATA}")
    problem = only(problems, "lora_r")
    assert problem.message == (
        "= 32 has no effect: the adapter in lora_model_dir keeps r = 16 (its adapter_config.json)"
    )
    assert not [p for p in problems if p.path == "lora_alpha"]  # the saved value: no harm
    config = make_config(f"{head}lora_r = 16\nlora_target_modules = ['q_proj']\n{DATA}")
    assert config.warnings == ()


def test_lora_keys_beside_an_adapter_on_the_hub_are_a_warning(make_config):
    config = make_config(f'adapter = "lora"\nlora_model_dir = "org/adapter"\nlora_r = 32\n{DATA}')
    (warning,) = config.warnings
    assert warning.path == "lora_r" and warning.line == 4
    assert "keeps the settings it was saved with" in warning.message


# -- eval, system message, schedules -----------------------------------------------------------


@pytest.mark.parametrize(
    "setting", ["eval_steps = 5", "evals_per_epoch = 2", "eval_batch_size = 4"]
)
def test_eval_keys_without_an_eval_set_are_warnings(make_config, setting):
    config = make_config(f"{setting}\n{DATA}")
    (warning,) = config.warnings
    assert warning.path == setting.split(" =")[0] and warning.line == 2
    assert "has no effect: there is no eval set" in warning.message
    assert make_config(f"{setting}\nval_set_size = 0.1\n{DATA}").warnings == ()


def test_eval_strategy_and_its_older_name(make_config, plugins):
    from sft.train.run import training_arguments

    val = "val_set_size = 0.25\n"
    for name in ("eval_strategy", "evaluation_strategy"):
        epoch = make_config(f"{name} = 'epoch'\n{val}{DATA}")
        assert training_arguments(epoch, 8, True, None).eval_strategy == "epoch"
        steps = make_config(f"{name} = 'steps'\neval_steps = 3\n{val}{DATA}")
        args = training_arguments(steps, 8, True, None)
        assert (args.eval_strategy, args.eval_steps) == ("steps", 3)
        # 'no' without an eval set is what the run does anyway; with one, it is refused: the
        # held-out rows would be lost to training and never evaluated
        assert make_config(f"{name} = 'no'\n{DATA}").warnings == ()
        problem = only(problems_of(make_config, f"{name} = 'no'\n{val}{DATA}"), name)
        assert "never evaluate" in problem.message and "val_set_size" in problem.hint
        problem = only(
            problems_of(make_config, f"{name} = 'epoch'\neval_steps = 2\n{val}{DATA}"), name
        )
        assert "conflicts with eval_steps" in problem.message
        problem = only(problems_of(make_config, f"{name} = 'steps'\n{val}{DATA}"), name)
        assert "needs eval_steps or evals_per_epoch" in problem.message
        (warning,) = make_config(f"{name} = 'epoch'\n{DATA}").warnings
        assert warning.path == name and "there is no eval set" in warning.message
    problem = only(
        problems_of(make_config, f"eval_strategy = 'steps'\nevaluation_strategy = 'epoch'\n{DATA}"),
        "evaluation_strategy",
    )
    assert "older name of the same key" in problem.message


def test_eval_sample_packing_without_an_eval_set_is_a_warning(make_config):
    config = make_config(f"sample_packing = true\neval_sample_packing = true\n{DATA}")
    assert [w.path for w in config.warnings] == ["eval_sample_packing"]


def test_default_system_message_without_a_chat_template_dataset_is_a_warning(make_config):
    config = make_config(f'default_system_message = "Be brief."\n{DATA}')
    (warning,) = config.warnings
    assert warning.path == "default_system_message" and warning.line == 2
    assert "no dataset has type = 'chat_template'" in warning.message
    chat = '[[datasets]]\npath = "org/chat"\ntype = "chat_template"\n'
    assert make_config(f'default_system_message = "Be brief."\n{chat}').warnings == ()


@pytest.mark.parametrize("scheduler", ["linear", "constant", "constant_with_warmup"])
def test_cosine_min_lr_ratio_with_another_scheduler_is_an_error(make_config, scheduler):
    text = f'lr_scheduler = "{scheduler}"\ncosine_min_lr_ratio = 0.1\n{DATA}'
    problem = only(problems_of(make_config, text), "cosine_min_lr_ratio")
    assert f"has no effect with lr_scheduler = {scheduler!r}" in problem.message
    make_config(f'lr_scheduler = "cosine"\ncosine_min_lr_ratio = 0.1\n{DATA}')


def test_warmup_with_the_constant_schedule_is_an_error(make_config):
    problem = only(
        problems_of(make_config, f'lr_scheduler = "constant"\nwarmup_steps = 10\n{DATA}'),
        "warmup_steps",
    )
    assert "'constant' has no warmup" in problem.message
    assert "constant_with_warmup" in problem.hint
    make_config(f'lr_scheduler = "constant_with_warmup"\nwarmup_steps = 10\n{DATA}')


# -- optimizer keys ----------------------------------------------------------------------------


def test_adam_keys_with_sgd_are_an_error_naming_the_optimizers_that_read_them(make_config):
    problem = only(
        problems_of(make_config, f'optimizer = "sgd"\nadam_beta2 = 0.95\n{DATA}'), "adam_beta2"
    )
    assert problem.message.startswith("has no effect: optimizer 'sgd' does not use it")
    assert "adamw_torch" in problem.message and "adamw_8bit" in problem.message


def test_sgd_keys_with_adamw_or_adafactor_are_errors(make_config):
    for optimizer in ("adamw_torch", "adafactor"):
        text = f'optimizer = "{optimizer}"\nsgd_momentum = 0.9\n{DATA}'
        problem = only(problems_of(make_config, text), "sgd_momentum")
        assert f"optimizer {optimizer!r} does not use it (it is read by sgd)" in problem.message


def test_keys_an_optimizer_reads_from_another_plugin_are_fine(make_config):
    # bitsandbytes' AdamW reads the adamw plugin's betas and epsilon; Lion its betas.
    make_config(f'optimizer = "adamw_8bit"\nadam_beta2 = 0.95\nadam_epsilon = 1e-6\n{DATA}')
    make_config(f'optimizer = "lion_8bit"\nadam_beta1 = 0.95\n{DATA}')
    problems = problems_of(make_config, f'optimizer = "lion_8bit"\nadam_epsilon = 1e-6\n{DATA}')
    assert "does not use it" in only(problems, "adam_epsilon").message


def test_optimizer_keys_at_their_defaults_are_not_set(make_config):
    make_config(f'optimizer = "sgd"\nadam_beta1 = 0.9\n{DATA}')


# -- dataset source keys -----------------------------------------------------------------------


def test_split_name_revision_on_a_local_file_are_errors(make_config, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    text = (
        f'[[datasets]]\npath = "{tmp_path / "d.jsonl"}"\ntype = "alpaca"\nsplit = "test"\n'
        'name = "default"\nrevision = "v1"\n'
    )
    problems = problems_of(make_config, text)
    split = only(problems, "datasets[0].split")
    assert split.line == 5
    assert (
        split.message
        == f"= 'test' has no effect on {tmp_path / 'd.jsonl'}: its files are read whole, as one split"
    )
    assert "val_set_size or [[test_datasets]]" in split.hint
    assert "it applies to Hub datasets" in only(problems, "datasets[0].name").hint
    only(problems, "datasets[0].revision")


def test_split_on_a_directory_of_files_and_on_a_url_are_errors(make_config, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    text = (
        f'[[datasets]]\npath = "{tmp_path / "dir"}"\ntype = "alpaca"\nsplit = "test"\n'
        '[[test_datasets]]\npath = "s3://bucket/eval.jsonl"\ntype = "alpaca"\nsplit = "validation"\n'
    )
    problems = problems_of(make_config, text)
    only(problems, "datasets[0].split")
    only(problems, "test_datasets[0].split")


def test_split_on_a_hub_dataset_is_used_and_on_a_saved_dataset_is_an_error(make_config, tmp_path):
    import datasets

    make_config('[[datasets]]\npath = "org/data"\ntype = "alpaca"\nsplit = "test"\nname = "en"\n')
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}]).save_to_disk(str(saved))
    problems = problems_of(
        make_config, f'[[datasets]]\npath = "{saved}"\ntype = "alpaca"\nsplit = "test"\n'
    )
    assert "a saved dataset is loaded whole" in only(problems, "datasets[0].split").message


# -- plugins: chunked cross-entropy ------------------------------------------------------------


def test_chunked_cross_entropy_with_liger_fused_linear_cross_entropy_is_an_error(make_config):
    text = f"chunked_cross_entropy = true\nliger_fused_linear_cross_entropy = true\n{DATA}"
    problem = only(problems_of(make_config, text), "chunked_cross_entropy")
    assert "conflicts with liger_fused_linear_cross_entropy" in problem.message
    # a machine without liger also says that liger cannot run here, separately
    with pytest.raises(ConfigError, match="conflicts with liger_fused_linear_cross_entropy"):
        make_config(text)


def test_a_chunk_size_without_chunked_cross_entropy_is_an_error(make_config):
    problem = only(
        problems_of(make_config, f"chunked_cross_entropy_chunk = 256\n{DATA}"),
        "chunked_cross_entropy_chunk",
    )
    assert "chunked_cross_entropy is off" in problem.message


# -- where warnings show -----------------------------------------------------------------------


def test_validate_prints_warnings_in_order_and_succeeds(tmp_path, plugins, capsys):
    from sft.cli import main

    config = tmp_path / "config.toml"
    config.write_text(f'base_model = "m"\neval_steps = 5\ndefault_system_message = "Hi"\n{DATA}')
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2
    assert lines[0].startswith("warning: eval_steps (line 2): has no effect")
    assert lines[1].startswith("warning: default_system_message (line 3): has no effect")
