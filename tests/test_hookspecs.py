"""Every hook spec is documented, has a test of its own, and reaches plugins through the facade."""

from __future__ import annotations

import ast
import inspect
import re

import attrs
import pytest
from conftest import REPO

from sft import hookimpl, hookspecs
from sft.components import ConfigKeys, DistributedBackend, Kernel, Packer, PromptStrategy
from sft.config import load_config_text
from sft.config.schema import key
from sft.docgen import hooks_markdown
from sft.errors import PluginError, Problem
from sft.manager import SftPlugins, hook_names

MINIMAL = 'base_model = "m"\n[[datasets]]\npath = "a"\n'


def test_every_spec_has_a_full_docstring():
    for name in hook_names():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc.splitlines()) >= 3, f"{name} needs a full docstring"
        assert "Called" in doc, f"{name}: say when it is called"


def test_every_spec_is_documented_in_docs_plugins_hooks_md():
    text = (REPO / "docs" / "plugins" / "hooks.md").read_text()
    undocumented = [name for name in hook_names() if f"## `{name}(" not in text]
    assert not undocumented, f"run `python -m sft.docgen`; missing: {undocumented}"
    assert text == hooks_markdown(), "docs/plugins/hooks.md is stale: run `python -m sft.docgen`"


CALL_SITE_TESTS = REPO / "tests" / "train" / "test_run_hooks.py"


def hooks_tested_at_their_call_site() -> set[str]:
    """The hooks the recording `sft run` of tests/train/test_run_hooks.py checks."""
    tree = ast.parse(CALL_SITE_TESTS.read_text())
    (value,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["CALLED_BY_SFT_RUN"]
    ]
    return set(ast.literal_eval(value))


def test_every_spec_has_a_test_of_its_own():
    # A test named test_<hook>, or the call-site test: a real `sft run` with a recording plugin.
    sources = "\n".join(p.read_text() for p in REPO.joinpath("tests").rglob("test_*.py"))
    at_call_site = hooks_tested_at_their_call_site()
    untested = [
        n
        for n in hook_names()
        if n not in at_call_site and not re.search(rf"def test_{n}\b", sources)
    ]
    assert not untested, (
        f"add a test named test_<hook> (or list it in {CALL_SITE_TESTS.name}) for: {untested}"
    )


def fresh(*plugins: object) -> SftPlugins:
    loaded = SftPlugins.load(environ={})
    for index, plugin in enumerate(plugins):
        loaded.register(plugin, name=f"test{index}")
    return loaded


@attrs.frozen
class ShoutKeys:
    shout: bool = key(False, doc="Shout.")
    shout_volume: int = key(1, ge=1, doc="How loud.")


@attrs.frozen
class ShoutDatasetKeys:
    shout_field: str = key("text", doc="Field to shout.")


class ShoutPlugin:
    @hookimpl
    def sft_config_keys(self):
        return [ConfigKeys(ShoutKeys), ConfigKeys(ShoutDatasetKeys, scope="dataset")]

    @hookimpl
    def sft_validate_config(self, config):
        keys = config.section(ShoutKeys)
        if keys.shout_volume > 10 and not keys.shout:
            return [Problem("shout_volume", "set shout = true to use a volume")]
        return []


def test_sft_config_keys():
    plugins = fresh(ShoutPlugin())
    config = load_config_text(
        MINIMAL + 'shout_field = "body"\n', overrides=["shout=true"], plugins=plugins
    )
    assert config.section(ShoutKeys) == ShoutKeys(shout=True)
    assert config.datasets[0].section(ShoutDatasetKeys).shout_field == "body"
    assert ("test0", ConfigKeys(ShoutKeys)) in plugins.config_keys()


def test_sft_validate_config():
    plugins = fresh(ShoutPlugin())
    import pytest

    from sft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config_text("shout_volume = 11\n" + MINIMAL, plugins=plugins)
    (problem,) = error.value.problems
    assert problem.path == "shout_volume" and problem.line == 1  # located by the loader


class Components:
    @hookimpl
    def sft_register_prompt_strategies(self, register):
        register(PromptStrategy("shout", lambda ds, tok, cfg: lambda row: row))

    @hookimpl
    def sft_register_packers(self, register):
        register(
            Packer(
                "one_per_bin",
                lambda lengths, capacity, config, epoch: [[i] for i in range(len(lengths))],
            )
        )

    @hookimpl
    def sft_register_kernels(self, register):
        register(Kernel("noop", lambda: (False, "not on this machine")))

    @hookimpl
    def sft_register_distributed_backends(self, register):
        register(DistributedBackend("solo", lambda config: False, lambda config: {}))


def test_sft_register_prompt_strategies():
    plugins = fresh(Components())
    assert plugins.prompt_strategies().owner("shout") == "test0"
    config = load_config_text(MINIMAL + 'type = "shout"\n', plugins=plugins)
    assert config.datasets[0].type == "shout"


def test_sft_register_packers():
    packer = fresh(Components()).packers().get("one_per_bin")
    assert packer.pack([3, 4], 8, None, 0) == [[0], [1]]


def test_sft_register_kernels():
    assert fresh(Components()).kernels().get("noop").available() == (False, "not on this machine")


def test_sft_register_distributed_backends():
    assert fresh(Components()).distributed_backends().owner("solo") == "test0"


def test_sft_register_attention_backends():
    backends = fresh().attention_backends()
    assert {"sdpa", "eager"} <= set(backends.names())


def test_sft_register_optimizers():
    assert {"adamw_torch", "adamw_torch_fused"} <= set(fresh().optimizers().names())


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []
        self.callbacks: list = []

    @hookimpl
    def sft_prepare_tokenizer(self, tokenizer, config):
        tokenizer.chat_template = "{{ messages }}"

    @hookimpl
    def sft_patch_model(self, model, config):
        model["patched"] = True

    @hookimpl
    def sft_trainer_callbacks(self, config):
        return self.callbacks

    @hookimpl
    def sft_train_start(self, config, trainer):
        self.calls.append(("start", trainer))

    @hookimpl
    def sft_train_end(self, config, trainer, metrics):
        self.calls.append(("end", metrics["train_loss"]))

    @hookimpl
    def sft_before_save(self, config, model, output_dir):
        self.calls.append(("before_save", output_dir))

    @hookimpl
    def sft_after_save(self, config, output_dir):
        self.calls.append(("after_save", output_dir))


class Saver:
    def __init__(self, result):
        self.result = result

    @hookimpl
    def sft_save_model(self, config, model, tokenizer, output_dir):
        return self.result


def test_sft_prepare_tokenizer():
    from types import SimpleNamespace

    target = SimpleNamespace(chat_template=None)
    fresh(Recorder()).prepare_tokenizer(target, config=load_config_text(MINIMAL))
    assert target.chat_template == "{{ messages }}"


def test_sft_patch_model():
    model: dict = {}
    fresh(Recorder()).patch_model(model, config=load_config_text(MINIMAL))
    assert model == {"patched": True}


def test_sft_trainer_callbacks():
    from transformers import TrainerCallback

    recorder = Recorder()
    recorder.callbacks = [TrainerCallback]
    assert fresh(recorder).trainer_callbacks(None) == [TrainerCallback]
    recorder.callbacks = ["not a callback"]
    with pytest.raises(PluginError) as error:
        fresh(recorder).trainer_callbacks(None)
    message = str(error.value)
    assert message == (
        "plugin 'test0' (unknown package): sft_trainer_callbacks returned str 'not a callback'; "
        "expected TrainerCallback instances"
    )


def test_sft_train_start():
    recorder = Recorder()
    fresh(recorder).train_start(None, trainer="T")
    assert recorder.calls == [("start", "T")]


def test_sft_train_end():
    recorder = Recorder()
    fresh(recorder).train_end(None, trainer="T", metrics={"train_loss": 1.5})
    assert recorder.calls == [("end", 1.5)]


def test_sft_before_save():
    recorder = Recorder()
    fresh(recorder).before_save(None, model=None, output_dir="out")
    assert recorder.calls == [("before_save", "out")]


class FakeModel:
    def __init__(self):
        self.saved: list[str] = []

    def save_pretrained(self, path, **kwargs):
        self.saved.append(path)


def test_sft_save_model():
    # firstresult: a plugin's non-None result stops the chain before the core's default.
    model, tokenizer = FakeModel(), FakeModel()
    config = load_config_text(MINIMAL)
    plugins = fresh(Saver("sharded"), Saver(None))
    assert plugins.save_model(config, model, tokenizer, "out") == "sharded"
    assert model.saved == []
    # No plugin result: the core's default (trylast) saves the model and the tokenizer.
    assert fresh(Saver(None)).save_model(config, model, tokenizer, "out") == "model"
    assert model.saved == ["out"] and tokenizer.saved == ["out"]


def test_sft_after_save():
    recorder = Recorder()
    fresh(recorder).after_save(None, output_dir="out")
    assert recorder.calls == [("after_save", "out")]
