"""Plugin discovery through entry points, failures recorded, env selection, tracing."""

from __future__ import annotations

import io

import pytest

from sft import hookimpl
from sft.components import Optimizer
from sft.errors import PluginError
from sft.manager import SftPlugins
from sft.registry import UnknownComponentError

BUILTINS = {"sdpa", "eager", "adamw"}


def test_builtin_plugins_load_from_entry_points():
    plugins = SftPlugins.load(environ={})
    assert set(plugins.records) >= BUILTINS
    for name in BUILTINS:
        record = plugins.records[name]
        assert record.status == "ok", record.error
        assert record.package == "sft-train"
        assert record.module == f"sft.plugins.{name}"


def test_broken_import_is_recorded_with_its_distribution(throwaway_dist):
    throwaway_dist(
        "broken-sft-plugin",
        {"broken": "broken_sft_plugin"},
        {"broken_sft_plugin": "import not_a_real_module_xyz\n"},
    )
    plugins = SftPlugins.load(environ={})
    record = plugins.records["broken"]
    assert record.status == "error"
    assert record.package == "broken-sft-plugin"
    assert "not_a_real_module_xyz" in (record.error or "")
    failure = plugins.failure_for("broken")
    assert failure is not None and "broken-sft-plugin" in str(failure)
    # The others still load.
    assert all(plugins.records[name].status == "ok" for name in BUILTINS)


def test_hook_with_no_spec_is_an_error_with_a_did_you_mean(throwaway_dist):
    throwaway_dist(
        "typo-plugin",
        {"typo": "typo_plugin"},
        {
            "typo_plugin": """
            from sft import hookimpl

            @hookimpl
            def sft_register_optimizer(register):
                pass
            """
        },
    )
    plugins = SftPlugins.load(environ={})
    record = plugins.records["typo"]
    assert record.status == "error"
    assert "sft_register_optimizers" in (record.error or "")
    plugins.check_pending()  # the bad plugin was unregistered, nothing pending remains


def test_sft_plugins_loads_only_the_named_plugins():
    plugins = SftPlugins.load(environ={"SFT_PLUGINS": "sdpa, nonexistent"})
    assert plugins.records["sdpa"].status == "ok"
    assert plugins.records["adamw"].status == "not selected"
    assert plugins.optimizers().names() == []
    assert any("nonexistent" in problem for problem in plugins.problems)


def test_sft_disable_plugins_blocks_them():
    plugins = SftPlugins.load(environ={"SFT_DISABLE_PLUGINS": "eager"})
    assert plugins.records["eager"].status == "disabled"
    assert "eager" not in plugins.attention_backends()
    assert "sdpa" in plugins.attention_backends()


def test_tracing_writes_hook_calls():
    plugins = SftPlugins.load(environ={})
    out = io.StringIO()
    plugins.enable_tracing(out.write)
    plugins.optimizers()
    assert "sft_register_optimizers [adamw]" in out.getvalue()


def test_sft_trace_plugins_env_enables_tracing(capfd):
    plugins = SftPlugins.load(environ={"SFT_TRACE_PLUGINS": "1"})
    plugins.attention_backends()
    assert "sft_register_attention_backends" in capfd.readouterr().err


class _DuplicateAdamW:
    @hookimpl
    def sft_register_optimizers(self, register):
        register(Optimizer("adamw_torch", lambda params, config: None))


def test_same_component_name_from_two_plugins_is_an_error_naming_both():
    plugins = SftPlugins.load(environ={})
    plugins.register(_DuplicateAdamW(), name="copycat")
    with pytest.raises(PluginError) as error:
        plugins.optimizers().get("adamw_torch")
    assert "adamw" in str(error.value) and "copycat" in str(error.value)


class _RaisingRegistration:
    @hookimpl
    def sft_register_optimizers(self, register):
        raise RuntimeError("boom")


def test_a_register_hook_that_raises_is_recorded_against_its_plugin():
    plugins = SftPlugins.load(environ={})
    plugins.register(_RaisingRegistration(), name="raiser")
    registry = plugins.optimizers()
    assert plugins.records["raiser"].status == "error"
    assert "boom" in (plugins.records["raiser"].error or "")
    assert registry.get("adamw_torch").name == "adamw_torch"  # other plugins are unaffected
    with pytest.raises(UnknownComponentError, match="raiser"):
        registry.get("what_raiser_would_have_provided")


def test_a_conflict_blocks_only_the_contested_name():
    plugins = SftPlugins.load(environ={})
    plugins.register(_DuplicateAdamW(), name="copycat")
    assert plugins.optimizers().get("sgd").name == "sgd"


class _BadKeys:
    @hookimpl
    def sft_config_keys(self):
        raise RuntimeError("keys exploded")


class _NotAttrs:
    @hookimpl
    def sft_config_keys(self):
        return [object()]


@pytest.mark.parametrize("plugin", [_BadKeys(), _NotAttrs()])
def test_a_broken_config_keys_hook_is_a_plugin_error_not_a_traceback(plugin):
    from sft.cli import plugin_rows
    from sft.config import load_config_text

    plugins = SftPlugins.load(environ={})
    plugins.register(plugin, name="badkeys", package="bad-keys-dist")
    with pytest.raises(PluginError) as error:
        load_config_text('base_model = "m"\n[[datasets]]\npath = "a"\n', plugins=plugins)
    assert "badkeys" in str(error.value) and "bad-keys-dist" in str(error.value)
    row = {r["name"]: r for r in plugin_rows(plugins)}["badkeys"]  # `plugins list` still works
    assert row["status"] == "error" and "sft_config_keys" in row["error"]


def test_register_rejects_unknown_hooks_in_process():
    class Bad:
        @hookimpl
        def sft_not_a_hook(self):
            pass

    plugins = SftPlugins.load(environ={})
    with pytest.raises(PluginError, match="sft_not_a_hook"):
        plugins.register(Bad(), name="bad")


def test_a_hook_argument_with_a_default_is_refused_at_registration():
    """pluggy before 1.7 never passes an argument that has a default: the hook would silently
    see the default there."""

    class Quiet:
        @hookimpl
        def sft_save_model(self, config, model, tokenizer, output_dir, trainer=None):
            return None

    plugins = SftPlugins.load(environ={})
    with pytest.raises(PluginError) as error:
        plugins.register(Quiet(), name="quiet")
    assert "sft_save_model declares `trainer` with a default" in str(error.value)
    assert "quiet" not in [p for p, _ in plugins.manager.list_name_plugin()]


def test_every_installed_hook_implementation_receives_all_its_arguments(plugins):
    assert not plugins.broken
    callers = [c for c in vars(plugins.manager.hook).values() if hasattr(c, "get_hookimpls")]
    implementations = [(c.name, impl) for c in callers for impl in c.get_hookimpls()]
    assert len(implementations) > 20 and "sft_save_model" in {name for name, _ in implementations}
    for name, impl in implementations:
        assert not impl.kwargnames, (impl.plugin_name, name)
