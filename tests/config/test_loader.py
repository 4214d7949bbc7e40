"""Config loading: TOML and YAML alike, every problem collected with its key path and line."""

from __future__ import annotations

import itertools
import textwrap

import pytest

from sft.config import load_config, load_config_text
from sft.config.convert import to_dict
from sft.errors import ConfigError, UsageError
from sft.plugins.adamw import AdamKeys

TOML = """
base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
learning_rate = 2e-4
optimizer = "adamw_torch_fused"
adam_beta2 = 0.95
attn_implementation = "eager"
wandb_project = ""
strict = false

[[datasets]]
path = "data/train.jsonl"

[[datasets]]
path = "org/dataset"
split = "train"
"""

YAML = """
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
learning_rate: 2e-4   # YAML 1.1 reads this as a string; accepted as a number
optimizer: adamw_torch_fused
adam_beta2: 0.95
attn_implementation: eager
wandb_project:
strict: false
datasets:
  - path: data/train.jsonl
  - path: org/dataset
    split: train
"""


def problems_of(text: str, fmt: str = "toml", overrides=()) -> list:
    """The problems of a config validated against the test's plugins (the `plugins` fixture
    makes them the process's)."""
    from sft.manager import get_plugins

    with pytest.raises(ConfigError) as error:
        load_config_text(text, fmt, overrides=overrides, plugins=get_plugins())
    return error.value.problems


def test_toml_and_yaml_give_identical_configs(plugins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/train.jsonl is read from the working directory
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    from_toml = load_config(tmp_path / "c.toml")
    from_yaml = load_config(tmp_path / "c.yml" if False else tmp_path / "c.yaml")
    assert from_toml == from_yaml
    assert to_dict(from_toml) == to_dict(from_yaml)
    assert from_toml.section(AdamKeys) == from_yaml.section(AdamKeys) == AdamKeys(adam_beta2=0.95)
    assert from_toml.learning_rate == 2e-4
    assert from_toml.adam_beta2 == 0.95  # plugin keys read as attributes too
    assert from_toml.datasets[1].split == "train"


def test_misspelt_key_wrong_type_and_unknown_dataset_type_are_reported_together(plugins):
    text = textwrap.dedent(
        """\
        base_model = "m"
        learning_rat = 1e-4
        micro_batch_size = "four"

        [[datasets]]
        path = "x.jsonl"
        type = "chat_templat"
        """
    )
    problems = {p.path: p for p in problems_of(text)}
    assert set(problems) == {"learning_rat", "micro_batch_size", "datasets[0].type"}
    assert problems["learning_rat"].line == 2
    assert "did you mean 'learning_rate'" in problems["learning_rat"].message
    assert problems["micro_batch_size"].line == 3
    assert problems["micro_batch_size"].message == "expected an integer, found string 'four'"
    assert problems["datasets[0].type"].line == 7
    assert "unknown datasets[].type 'chat_templat'" in problems["datasets[0].type"].message


def test_yaml_problems_carry_line_numbers(plugins):
    text = "base_model: m\nlora_r: 0\ndatasets:\n  - path: a\n    pth: b\n"
    problems = {p.path: p.line for p in problems_of(text, "yaml")}
    assert problems == {"lora_r": 2, "datasets[0].pth": 5}


def test_unknown_optimizer_has_a_did_you_mean_and_the_installed_list(plugins):
    (problem,) = problems_of(
        'base_model = "m"\noptimizer = "adamw_torh"\n[[datasets]]\npath = "a"\n'
    )
    assert problem.path == "optimizer" and problem.line == 2
    assert "did you mean 'adamw_torch'" in problem.message
    assert "adamw_torch_fused" in problem.message


def test_required_keys_are_reported_missing(plugins):
    paths = {p.path for p in problems_of("[[datasets]]\ntype = 'x'\n")}
    assert {"base_model", "datasets[0].path"} <= paths


def test_unsupported_axolotl_key_is_named_as_such_but_blank_ones_pass(plugins):
    base = 'base_model = "m"\n[[datasets]]\npath = "a"\n'
    (problem,) = problems_of("gptq = true\n" + base)
    assert problem.path == "gptq" and problem.line == 1
    assert problem.message == (
        "Axolotl's `gptq` — trains an adapter on a GPTQ-quantized model — is not supported by sft"
    )
    assert problem.hint == "remove it; instead, use `load_in_4bit` (QLoRA)"
    load_config_text('gptq = false\nwandb_project = ""\ndeepspeed = false\n' + base)


def test_planned_key_set_to_a_non_default_value_is_not_silently_ignored(plugins):
    import attrs

    from sft import hookimpl
    from sft.components import ConfigKeys
    from sft.config.schema import key

    @attrs.frozen
    class Future:
        future_feature: bool = key(False, doc="Declared before its feature lands.", planned=True)

    class Plugin:
        @hookimpl
        def sft_config_keys(self):
            return [ConfigKeys(Future)]

    plugins.register(Plugin(), name="future")
    base = 'base_model = "m"\n[[datasets]]\npath = "a"\n'
    load_config_text("future_feature = false\n" + base, plugins=plugins)  # the default is harmless
    (problem,) = problems_of("future_feature = true\n" + base)
    assert problem.path == "future_feature" and "not supported by sft yet" in problem.message


def test_bounds_and_cross_key_conflicts(plugins):
    text = 'base_model = "m"\nadam_beta1 = 1.0\nattn_implementation = "sdpa"\neager_attention = true\n[[datasets]]\npath = "a"\n'
    messages = {p.path: p.message for p in problems_of(text)}
    assert "eager_attention" in messages
    text = 'base_model = "m"\nadam_beta1 = 1.0\n[[datasets]]\npath = "a"\n'
    ((path, message),) = {p.path: p.message for p in problems_of(text)}.items()
    assert path == "adam_beta1" and message == "must be < 1, found 1"


def test_set_overrides_values_and_marks_their_problems(plugins):
    text = 'base_model = "m"\n[[datasets]]\npath = "a"\n'
    config = load_config_text(
        text, overrides=["learning_rate=1e-5", "datasets[0].path=org/b", "adam_beta1=0.8"]
    )
    assert config.learning_rate == 1e-5
    assert config.datasets[0].path == "org/b"
    assert config.adam_beta1 == 0.8
    (problem,) = problems_of(text, overrides=["micro_batch_size=abc"])
    assert problem.file == "--set" and "(--set)" in problem.render()
    with pytest.raises(UsageError):
        load_config_text(text, overrides=["no-equals-sign"])
    with pytest.raises(UsageError):
        load_config_text(text, overrides=["datasets[3].path=x"])


def test_attention_aliases_resolve(plugins):
    config = load_config_text(
        'base_model = "m"\neager_attention = true\n[[datasets]]\npath = "a"\n'
    )
    assert config.attention == "eager"
    config = load_config_text('base_model = "m"\n[[datasets]]\npath = "a"\n')
    assert config.attention == "sdpa"


def test_invalid_syntax_is_a_config_error_not_a_traceback(plugins):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_text("base_model = = 1")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config_text("a: [1,", "yaml")


def test_set_accepts_toml_inline_tables_and_reports_bad_paths(plugins):
    text = 'base_model = "m"\n[[datasets]]\npath = "a"\n'
    config = load_config_text(
        text,
        overrides=[
            'special_tokens={pad_token = "<pad>"}',
            "adapter=lora",
            "lora_target_modules=[q_proj, v_proj]",
        ],
    )
    assert config.special_tokens == {"pad_token": "<pad>"}
    assert config.lora_target_modules == ("q_proj", "v_proj")
    for bad in ("datasets.path=x", "base_model.x=1", "datasets[-1].path=x"):
        with pytest.raises(UsageError):
            load_config_text(text, overrides=[bad])
    with pytest.raises(ConfigError, match="expected an integer, found a table"):
        load_config_text(text, overrides=["lora_r.x=1"])


def test_non_finite_numbers_and_non_string_keys_are_problems(plugins):
    base = "base_model: m\ndatasets:\n  - path: a\n"
    problems = {
        p.path: p.message
        for p in problems_of(base + "learning_rate: .nan\nval_set_size: .inf\n1: 2\n", "yaml")
    }
    assert problems["learning_rate"] == "expected a finite number, found number nan"
    assert "val_set_size" in problems and problems["1"].startswith("keys must be names")


def test_optional_table_reports_the_inner_problem(plugins):
    (problem,) = problems_of(
        'base_model = "m"\nspecial_tokens = {pad_token = 5}\n[[datasets]]\npath = "a"\n'
    )
    assert "'pad_token' should be a string" in problem.message


def laughs(levels: int) -> str:
    """A "billion laughs" YAML config: 10**levels leaves from a few hundred bytes."""
    names = "abcdefghij"[:levels]
    lines = ["base_model: m", "datasets:", "  - path: a", "    storage_options:"]
    lines.append(f"      a: &a [{', '.join(['lol'] * 10)}]")
    for prev, name in itertools.pairwise(names):
        lines.append(f"      {name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (laughs(6), "aliases (*name) expand to more than 100,000 values"),
        ("base_model: m\ndatasets:\n  - &d {path: a, x: [*d]}\n", "a cycle"),
        ("base_model: m\nlora_r: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("base_model: m\nlora_r: " + "9" * 5000 + "\n", "an integer longer than 4300 digits"),
    ],
    ids=["1e6-leaves", "cycle", "deep", "huge-int"],
)
def test_yaml_that_would_expand_or_overflow_is_refused_quickly(plugins, text, message):
    import time

    start = time.perf_counter()
    (problem,) = problems_of(text, "yaml")
    assert message in problem.message
    assert time.perf_counter() - start < 5


def test_yaml_anchors_and_merge_keys_still_load(plugins):
    text = (
        "base_model: m\ndatasets:\n  - &chat {path: a, type: chat_template, split: train}\n"
        "  - <<: *chat\n    path: b\ntest_datasets:\n  - *chat\n"
    )
    config = load_config_text(text, "yaml")
    assert [(d.path, d.type, d.split) for d in (*config.datasets, *config.test_datasets)] == [
        ("a", "chat_template", "train"),
        ("b", "chat_template", "train"),
        ("a", "chat_template", "train"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_r = " + "[" * 5000 + "]" * 5000, "invalid TOML: nested too deeply"),
        ("lora_r = " + "9" * 5000, "invalid TOML: an integer longer than 4300 digits"),
    ],
)
def test_toml_that_overflows_is_a_config_error(plugins, text, message):
    (problem,) = problems_of('base_model = "m"\n' + text + '\n[[datasets]]\npath = "a"\n')
    assert message in problem.message


def test_set_values_are_bounded_like_the_config(plugins):
    text = 'base_model = "m"\n[[datasets]]\npath = "a"\n'
    bomb = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]" + "".join(
        f", &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in itertools.pairwise("abcdefg")
    )
    for value, message in (
        (bomb + "]", "expand to more than 100,000 values"),
        ("9" * 5000, "an integer longer than 4300 digits"),
    ):
        with pytest.raises(UsageError, match=r"--set lora_r: value refused: .*" + message):
            load_config_text(text, overrides=[f"lora_r={value}"])


def test_a_missing_local_dataset_file_is_a_problem_with_its_line(plugins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are read from the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "here.jsonl").write_text("")
    (tmp_path / "t.json.gz").write_text("")
    text = textwrap.dedent(
        """\
        base_model = "m"
        [[datasets]]
        path = "here.jsonl"
        [[datasets]]
        path = "data/missing.jsonl"
        [[datasets]]
        path = "org/hub-dataset"
        [[datasets]]
        path = "s3://bucket/train.jsonl"
        [[test_datasets]]
        path = "~/t.json.gz"
        [[test_datasets]]
        path = "~/gone.json.gz"
        """
    )
    problems = problems_of(text)
    first, second = (p.render().split("\n")[0] for p in problems)
    assert first == "datasets[1].path (line 5): file not found: data/missing.jsonl [this machine]"
    assert second.startswith("test_datasets[1].path (line 13): file not found: ")
    assert second.endswith("gone.json.gz [this machine]")  # "~" may be shown expanded
    assert str(tmp_path) in (problems[0].hint or "")
    assert load_config_text(text, machine_checks=False).datasets[1].path == "data/missing.jsonl"


def test_axolotls_older_tokens_table_is_read_as_special_tokens(plugins):
    base = "base_model: m\ndatasets:\n  - path: a\n"
    config = load_config_text(
        base + 'tokens:\n  pad_token: "<|padding|>"\n  eos_token: "<|endoftext|>"\n', "yaml"
    )
    assert config.special_tokens == {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>"}
    assert config.tokens is None
    assert to_dict(config)["special_tokens"] == config.special_tokens  # saved as the new key
    (problem,) = problems_of(base + "tokens:\n  pad_token: 5\n", "yaml")
    assert (problem.path, problem.line) == ("tokens", 4)  # the name as written
    assert "'pad_token' should be a string" in problem.message
    (problem,) = problems_of(
        base + "special_tokens:\n  pad_token: x\ntokens:\n  eos_token: y\n", "yaml"
    )
    assert problem.path == "tokens" and "beside special_tokens" in problem.message
    (problem,) = problems_of(base + "tokens:\n  colour: blue\n", "yaml")
    assert problem.message == "expected a list of strings, found a table"
