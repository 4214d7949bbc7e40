"""What a plugin author meets at the boundary: scoped keys, checked hook results, availability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.errors import ConfigError, PluginError
from sft.manager import SftPlugins, set_plugins
from tests.conftest import write_jsonl

KEY_PLUGIN = """
import attrs
from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import key

@attrs.frozen
class Keys:
    {key}: float = key(0.0, doc="A key.")

@hookimpl
def sft_config_keys():
    return [ConfigKeys(Keys)]
"""


@pytest.fixture
def two_plugins_one_key(throwaway_dist, monkeypatch):
    """Two installed plugins that both declare `shared_momentum` (and one declares its own)."""
    throwaway_dist(
        "sft-first",
        {"first": "first_plugin"},
        {"first_plugin": KEY_PLUGIN.format(key="shared_momentum")},
    )
    throwaway_dist(
        "sft-second",
        {"second": "second_plugin"},
        {"second_plugin": KEY_PLUGIN.format(key="shared_momentum")},
    )
    loaded = SftPlugins.load(environ={})
    set_plugins(loaded)
    yield loaded
    set_plugins(None)


def test_a_key_two_plugins_declare_blocks_only_configs_that_set_it(two_plugins_one_key, tmp_path):
    from sft.cli import plugin_rows
    from sft.config import load_config_text

    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    body = f'base_model = "m"\n[[datasets]]\npath = "{tmp_path}/d.jsonl"\ntype = "completion"\n'
    config = load_config_text(body, plugins=two_plugins_one_key, machine_checks=False)
    assert config.learning_rate > 0  # a config that uses neither plugin's key validates

    with pytest.raises(ConfigError) as error:
        load_config_text(
            "shared_momentum = 0.9\n" + body, plugins=two_plugins_one_key, machine_checks=False
        )
    (problem,) = error.value.problems
    assert problem.path == "shared_momentum" and problem.line == 1
    assert "declared by both 'first' and 'second'" in problem.message
    assert "SFT_DISABLE_PLUGINS=first" in problem.hint

    rows = {row["name"]: row for row in plugin_rows(two_plugins_one_key)}
    for name in ("first", "second"):
        assert rows[name]["status"] == "error"
        assert "'shared_momentum' is declared by both 'first' and 'second'" in rows[name]["error"]
    assert rows["alpaca"]["status"] == "ok"


def test_a_dataset_key_of_another_type_is_an_error_naming_its_type(make_config):
    text = """
[[datasets]]
path = "{tmp}/d.jsonl"
type = "chat_template"
field_instruction = "prompt"
field = "text"
"""
    with pytest.raises(ConfigError) as error:
        make_config(text, machine_checks=False)
    messages = {p.path: p for p in error.value.problems}
    assert set(messages) == {"datasets[0].field_instruction", "datasets[0].field"}
    alpaca = messages["datasets[0].field_instruction"]
    assert (
        "belongs to dataset type 'alpaca', 'alpaca:chat', 'alpaca:chatml', 'alpaca:instruct' "
        "and 24 more (`sft plugins list`) (plugin alpaca)" in alpaca.message
    )
    assert "this dataset has type 'chat_template'" in alpaca.message
    assert alpaca.line == 6
    assert "'completion'" in messages["datasets[0].field"].message


def test_dataset_keys_of_the_datasets_own_type_and_blank_ones_are_accepted(make_config):
    config = make_config(
        """
[[datasets]]
path = "{tmp}/d.jsonl"
type = "alpaca_chat"
field_instruction = "prompt"

[[datasets]]
path = "{tmp}/e.jsonl"
type = "chat_template"
field_messages = "conversations"
field_instruction = ""
""",
        machine_checks=False,
    )
    assert config.datasets[0].field_instruction == "prompt"
    assert config.datasets[1].field_messages == "conversations"


def test_format_keys_on_pretokenized_rows_are_an_error(make_config):
    with pytest.raises(ConfigError) as error:
        make_config('[[datasets]]\npath = "{tmp}/d.jsonl"\nfield_messages = "m"\n')
    (problem,) = error.value.problems
    assert "this dataset has pre-tokenized rows (no type)" in problem.message
    assert "set type = 'chat_template'" in problem.hint


STRATEGY_PLUGIN = """
from sft import hookimpl
from sft.components import PromptStrategy
from sft.data.sample import Rendered

def factory(ds, tokenizer, config):
    def render(row):
        {body}
    return render

@hookimpl
def sft_register_prompt_strategies(register):
    register(PromptStrategy("qa", factory))
"""


def _prepare_with(throwaway_dist, tmp_path: Path, body: str, tokenizer) -> None:
    from sft.config import load_config_text
    from sft.data.pipeline import prepare_datasets

    throwaway_dist("sft-qa", {"qa": "qa_plugin"}, {"qa_plugin": STRATEGY_PLUGIN.format(body=body)})
    loaded = SftPlugins.load(environ={})
    set_plugins(loaded)
    try:
        write_jsonl(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}])
        config = load_config_text(
            f'base_model = "m"\n[[datasets]]\npath = "{tmp_path}/qa.jsonl"\ntype = "qa"\n',
            plugins=loaded,
            machine_checks=False,
        )
        prepare_datasets(config, tokenizer=tokenizer, plugins=loaded, show_progress=False)
    finally:
        set_plugins(None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "return {'input_ids': [1, 2], 'labels': [1, 2]}",
            "returned dict with keys ['input_ids', 'labels']",
        ),
        (
            "return Rendered(text='ab', spans=((0, 5),))",
            "returned a Rendered with span (0, 5), which is not a (start, end) pair",
        ),
        ("return [Rendered(text='ab', spans=()), None]", "returned NoneType"),
    ],
    ids=["dict", "span-outside-text", "list-with-none"],
)
def test_a_strategy_breaking_the_contract_is_named_with_its_package_and_row(
    throwaway_dist, tmp_path, tokenizer, body, expected
):
    with pytest.raises(PluginError) as error:
        _prepare_with(throwaway_dist, tmp_path, body, tokenizer)
    message = str(error.value)
    assert "prompt strategy 'qa' (plugin qa, package sft-qa 0.0.1)" in message
    assert expected in message
    assert f"{tmp_path}/qa.jsonl, row 1 (datasets[0])" in message
    assert "expected Rendered or Tokenized" in message


def test_a_strategy_that_raises_is_named_on_each_row(throwaway_dist, tmp_path, tokenizer):
    from sft.errors import DataError

    with pytest.raises(DataError) as error:
        _prepare_with(throwaway_dist, tmp_path, "return row['missing']", tokenizer)
    assert "prompt strategy 'qa' (plugin qa, package sft-qa 0.0.1) raised KeyError" in str(
        error.value.render()
    )


def test_a_strategy_factory_that_returns_no_callable_is_a_plugin_error(
    throwaway_dist, tmp_path, tokenizer
):
    plugin = STRATEGY_PLUGIN.replace("    return render\n", "    return 'render'\n")
    throwaway_dist("sft-qa", {"qa": "qa_plugin"}, {"qa_plugin": plugin.format(body="pass")})
    from sft.config import load_config_text
    from sft.data.pipeline import prepare_datasets

    loaded = SftPlugins.load(environ={})
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "a"}])
    config = load_config_text(
        f'base_model = "m"\n[[datasets]]\npath = "{tmp_path}/qa.jsonl"\ntype = "qa"\n',
        plugins=loaded,
        machine_checks=False,
    )
    with pytest.raises(PluginError, match=r"'qa' \(plugin qa, package sft-qa 0.0.1\): its "):
        prepare_datasets(config, tokenizer=tokenizer, plugins=loaded, show_progress=False)


def test_plugins_list_shows_kernels_and_attention_without_their_runtime_as_unavailable(
    capsys,
):
    from sft.cli import main
    from sft.hardware import cuda_present, installed

    if cuda_present() and installed("liger_kernel") and installed("flash_attn"):
        pytest.skip("this machine can run liger and flash-attn")
    assert main(["plugins", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["liger"]["status"] == "unavailable"
    assert rows["liger"]["error"].startswith("liger: ")
    assert "pip install" in rows["liger"]["error"] or "GPU" in rows["liger"]["error"]
    assert rows["flash_attn"]["status"] == "unavailable"
    assert "flash_attention_2: " in rows["flash_attn"]["error"]
    assert rows["sdpa"]["status"] == "ok"


def test_validate_refuses_a_kernel_the_machine_cannot_run_from_its_registry(make_config):
    from sft.plugins.liger import available

    if available()[0]:
        pytest.skip("liger runs on this machine")
    text = 'liger_rms_norm = true\n[[datasets]]\npath = "{tmp}/d.jsonl"\ntype = "completion"\n'
    with pytest.raises(ConfigError) as error:
        make_config(text)
    (problem,) = [p for p in error.value.problems if p.path == "liger_rms_norm"]
    assert problem.path == "liger_rms_norm" and problem.line == 2  # after make_config's line
    assert "kernel 'liger' (plugin liger) is unavailable on this machine: " in problem.message
    assert problem.hint == "remove liger_rms_norm here"
    assert make_config(text, machine_checks=False).liger_rms_norm is True  # --portable


def test_a_hook_wrapper_is_refused_at_load_naming_the_hook():
    from sft import hookimpl

    class Wrapping:
        @hookimpl(wrapper=True)
        def sft_patch_model(self, model, config):
            return (yield)

    loaded = SftPlugins.load(environ={})
    with pytest.raises(PluginError) as error:
        loaded.register(Wrapping(), name="wrapping")
    assert "wraps sft_patch_model (hookwrapper/wrapper = True)" in str(error.value)


def test_a_plugin_failing_in_a_run_hook_is_named_and_its_own_errors_pass_through():
    from sft import hookimpl
    from sft.errors import ModelError

    class Failing:
        def __init__(self, error: Exception) -> None:
            self.error = error

        @hookimpl
        def sft_patch_model(self, model, config):
            raise self.error

    loaded = SftPlugins.load(environ={})
    loaded.register(Failing(KeyError("layers")), name="failing")
    with pytest.raises(PluginError) as error:
        loaded.patch_model(model=None, config=None)
    assert str(error.value) == (
        "plugin 'failing' (unknown package): sft_patch_model raised KeyError: 'layers'"
    )
    clear = ModelError("this model has no layers\n  fix: use another model")
    loaded = SftPlugins.load(environ={})
    loaded.register(Failing(clear), name="failing")
    with pytest.raises(ModelError) as passed:
        loaded.patch_model(model=None, config=None)
    assert passed.value is clear


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("fix it", "sft_validate_config returned str 'fix it'; expected a list of Problem"),
        (["fix it"], "sft_validate_config returned str 'fix it'; expected sft.plugin.Problem"),
    ],
)
def test_validate_config_results_must_be_problems(make_config, plugins, returned, expected):
    from sft import hookimpl

    class Validating:
        @hookimpl
        def sft_validate_config(self, config):
            return returned

    plugins.register(Validating(), name="validating")
    with pytest.raises(PluginError) as error:
        make_config('[[datasets]]\npath = "{tmp}/d.jsonl"\ntype = "completion"\n')
    assert str(error.value).startswith("plugin 'validating' (unknown package): " + expected)


def test_dataset_keys_can_name_the_types_they_apply_to(make_config, plugins):
    import attrs

    from sft import hookimpl
    from sft.components import ConfigKeys
    from sft.config.schema import key

    @attrs.frozen
    class SourceKeys:
        source_note: str = key("", doc="A note on where a completion text comes from.")

    class Notes:
        @hookimpl
        def sft_config_keys(self):
            return [ConfigKeys(SourceKeys, scope="dataset", dataset_types=("completion",))]

    plugins.register(Notes(), name="notes")
    entry = '[[datasets]]\npath = "{tmp}/d.jsonl"\ntype = "%s"\nsource_note = "web"\n'
    config = make_config(entry % "completion", machine_checks=False)
    assert config.datasets[0].section(SourceKeys).source_note == "web"
    with pytest.raises(ConfigError) as error:
        make_config(entry % "alpaca", machine_checks=False)
    (problem,) = error.value.problems
    assert problem.message.startswith("belongs to dataset type 'completion' (plugin notes)")
