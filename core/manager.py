"""Plugin discovery and the typed facade the core calls hooks through.

Plugins are found only through the `sft.plugins` entry-point group; the built-in plugins are
declared there too, so the core never imports a plugin by name. Entry points are loaded one at
a time and a failure becomes a recorded error on that plugin, never a crash and never a skip.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
import pluggy

from sft import hookspecs
from sft.components import ConfigKeys
from sft.errors import PluginError, Problem, SftError
from sft.registry import KINDS, Registry, did_you_mean

if TYPE_CHECKING:
    from sft.components import (
        AttentionBackend,
        DistributedBackend,
        Kernel,
        Objective,
        Optimizer,
        Packer,
        PromptStrategy,
    )
    from sft.config.schema import Config

ENTRY_POINT_GROUP = "sft.plugins"
CORE_PLUGIN = "sft-core"
PluginStatus = Literal["ok", "error", "disabled", "not selected"]


@attrs.define
class PluginRecord:
    """What `sft plugins list` shows for one plugin."""

    name: str
    package: str | None
    version: str | None
    module: str
    status: PluginStatus = "ok"
    error: str | None = None


def _env_list(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _spec_names() -> list[str]:
    return [name for name in dir(hookspecs) if name.startswith("sft_")]


def _defaulted_hook_arguments(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook arguments a plugin's implementation declares with a default value."""
    found = []
    for caller in manager.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and impl.kwargnames:
                names = ", ".join(f"`{name}`" for name in impl.kwargnames)
                found.append(f"{caller.name} declares {names} with a default")
    return found


class SftPlugins:
    """The loaded plugins and a typed method per hook, so core call sites are type-checked."""

    def __init__(self, manager: pluggy.PluginManager, records: dict[str, PluginRecord]) -> None:
        self.manager = manager
        self.records = records
        self.problems: list[str] = []
        self._registries: dict[str, Registry[Any]] = {}
        self._tracing = False

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        entry_points: Iterable[importlib_metadata.EntryPoint] | None = None,
    ) -> SftPlugins:
        """Load the plugins installed in this environment, honouring `SFT_*` variables."""
        env = os.environ if environ is None else environ
        manager = pluggy.PluginManager("sft")
        manager.add_hookspecs(hookspecs)
        plugins = cls(manager, {})
        only = _env_list(env.get("SFT_PLUGINS"))
        disabled = set(_env_list(env.get("SFT_DISABLE_PLUGINS")) or [])
        from sft import save

        manager.register(save, name=CORE_PLUGIN)  # the core's own defaults (trylast)
        if entry_points is None:
            entry_points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=lambda ep: ep.name):
            dist = ep.dist
            record = PluginRecord(
                name=ep.name,
                package=dist.name if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            if ep.name in plugins.records:
                first = plugins.records[ep.name]
                record.status, record.error = (
                    "error",
                    f"entry point name {ep.name!r} is already used by {first.package}; "
                    "plugin names must be unique",
                )
                plugins.records[f"{ep.name} ({record.package})"] = record
                continue
            plugins.records[ep.name] = record
            if ep.name in disabled:
                record.status = "disabled"
                manager.set_blocked(ep.name)
                continue
            if only is not None and ep.name not in only:
                record.status = "not selected"
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import failure is the plugin's, recorded, not raised
                record.status = "error"
                record.error = f"cannot import {ep.value}: {type(exc).__name__}: {exc}"
                continue
            plugins._register(module, record)
        if only is not None:
            for name in only:
                if name not in plugins.records:
                    plugins.problems.append(
                        f"SFT_PLUGINS names {name!r} but no installed plugin has that name"
                    )
        if env.get("SFT_TRACE_PLUGINS", "").strip() not in ("", "0"):
            plugins.enable_tracing()
        return plugins

    def _register(self, plugin: object, record: PluginRecord) -> None:
        try:
            self.manager.register(plugin, name=record.name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
            return
        unmatched = [
            caller.name
            for caller in self.manager.get_hookcallers(plugin) or []
            if caller.spec is None
        ]
        if unmatched:
            self.manager.unregister(plugin)
            details = []
            for name in unmatched:
                guess = did_you_mean(name, _spec_names())
                details.append(f"{name} (did you mean {guess}?)" if guess else name)
            record.status = "error"
            record.error = f"implements hooks that sft does not define: {', '.join(details)}"
            return
        wrappers = [
            caller.name
            for caller in self.manager.get_hookcallers(plugin) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper)
        ]
        if wrappers:
            self.manager.unregister(plugin)
            record.status = "error"
            record.error = (
                f"wraps {', '.join(wrappers)} (hookwrapper/wrapper = True): sft calls each "
                "implementation on its own to name the plugin of any failure, so wrappers never "
                "run; implement the hook plainly"
            )
            return
        if defaulted := _defaulted_hook_arguments(self.manager, plugin):
            self.manager.unregister(plugin)
            record.status = "error"
            record.error = (
                f"{'; '.join(defaulted)}: pluggy before 1.7 never passes an argument that has "
                "a default value (the hook would see the default there); remove the defaults"
            )

    def register(self, plugin: object, name: str, package: str | None = None) -> PluginRecord:
        """Register an in-process plugin (tests, notebooks); checked like an entry point."""
        record = PluginRecord(name=name, package=package, version=None, module=repr(plugin))
        self.records[name] = record
        self._register(plugin, record)
        self._registries.clear()
        if record.status == "error":
            raise PluginError(f"plugin {name!r}: {record.error}", plugin=name, package=package)
        return record

    def check_pending(self) -> None:
        """Raise if any registered hook implementation matches no spec."""
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc

    def enable_tracing(self, write: Callable[[str], Any] | None = None) -> None:
        writer = write or sys.stderr.write
        self.manager.trace.root.setwriter(writer)
        self.manager.enable_tracing()
        self._tracing = True

    @property
    def broken(self) -> dict[str, str]:
        return {
            name: record.error or ""
            for name, record in self.records.items()
            if record.status == "error"
        }

    def describe(self, name: str) -> str:
        """'plugin NAME, package DIST VERSION' for messages that blame a plugin."""
        record = self.records.get(name)
        if record is None:
            return f"plugin {name}"
        package = f"{record.package} {record.version}" if record.version else record.package
        return f"plugin {name}, package {package or 'unknown'}"

    def failure_for(self, name: str) -> PluginError | None:
        record = self.records.get(name)
        if record is None or record.status != "error":
            return None
        return PluginError(
            f"plugin {record.name!r} (package {record.package or 'unknown'}) failed: {record.error}",
            plugin=record.name,
            package=record.package,
        )

    # -- calling -----------------------------------------------------------------------------

    def _each(
        self, hook_name: str, strict: bool = True, first_result: bool = False, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Call every implementation of a hook separately, in pluggy's order, returning
        (plugin name, result); with `first_result`, stop at the first result that is not None.

        An implementation that raises is the plugin's bug: it is recorded against the plugin and
        raised as a `PluginError` naming it (`strict`), or skipped (`sft plugins list`). An
        `SftError` it raises (a clear error of its own) passes through unchanged.
        """
        caller = getattr(self.manager.hook, hook_name)
        results = []
        for impl in reversed(caller.get_hookimpls()):
            if self._tracing:
                self.manager.trace.root.get("hook")(f"{hook_name} [{impl.plugin_name}]")
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except SftError:
                raise
            except Exception as exc:
                error = self._record_failure(impl.plugin_name, hook_name, exc)
                if strict:
                    raise error from exc
                continue
            if first_result and result is None:
                continue
            results.append((impl.plugin_name, result))
            if first_result:
                break
        return results

    def _record_failure(
        self,
        plugin: str,
        hook_name: str,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> PluginError:
        message = message or f"{hook_name} raised {type(exc).__name__}: {exc}"
        record = self.records.get(plugin)
        if record is not None:
            record.status, record.error = "error", message
        package = record.package if record else None
        return PluginError(
            f"plugin {plugin!r} ({package or 'unknown package'}): {message}",
            plugin=plugin,
            package=package,
        )

    def registry(self, kind: str) -> Registry[Any]:
        """The registry of one component kind, built on first use from the register hooks."""
        if kind not in self._registries:
            registry: Registry[Any] = Registry(KINDS[kind])
            registry.broken_plugins = self.broken
            current = {"plugin": ""}

            def register(component: Any) -> None:
                registry.add(component, current["plugin"])

            caller = getattr(self.manager.hook, KINDS[kind].hook)
            for impl in reversed(caller.get_hookimpls()):
                current["plugin"] = impl.plugin_name
                if self._tracing:
                    self.manager.trace.root.get("hook")(f"{KINDS[kind].hook} [{impl.plugin_name}]")
                try:
                    impl.function(register=register)
                except Exception as exc:  # the plugin's bug: recorded against it, not raised here
                    self._record_failure(impl.plugin_name, KINDS[kind].hook, exc)
            registry.broken_plugins = self.broken
            self._registries[kind] = registry
        return self._registries[kind]

    def prompt_strategies(self) -> Registry[PromptStrategy]:
        return self.registry("prompt_strategies")

    def packers(self) -> Registry[Packer]:
        return self.registry("packers")

    def attention_backends(self) -> Registry[AttentionBackend]:
        return self.registry("attention_backends")

    def kernels(self) -> Registry[Kernel]:
        return self.registry("kernels")

    def optimizers(self) -> Registry[Optimizer]:
        return self.registry("optimizers")

    def distributed_backends(self) -> Registry[DistributedBackend]:
        return self.registry("distributed_backends")

    def objectives(self) -> Registry[Objective]:
        return self.registry("objectives")

    def config_keys(self, strict: bool = True) -> list[tuple[str, ConfigKeys]]:
        found = []
        for plugin, groups in self._each("sft_config_keys", strict=strict):
            for keys in groups or ():
                if not isinstance(keys, ConfigKeys) or not attrs.has(keys.cls):
                    error = self._record_failure(
                        plugin,
                        "sft_config_keys",
                        TypeError(f"returned {keys!r}, not ConfigKeys(<attrs class>)"),
                    )
                    if strict:
                        raise error
                    continue
                found.append((plugin, keys))
        return found

    def _returned(self, plugin: str, hook_name: str, result: Any, expected: str) -> PluginError:
        """A hook implementation returned what its spec does not allow: the plugin's bug."""
        found = f"{type(result).__name__} {result!r:.80}"
        return self._record_failure(
            plugin, hook_name, message=f"{hook_name} returned {found}; expected {expected}"
        )

    def validate_config(self, config: Config) -> list[Problem]:
        found = []
        for plugin, problems in self._each("sft_validate_config", config=config):
            if problems is None:
                continue
            if isinstance(problems, (str, bytes)) or not isinstance(problems, Iterable):
                raise self._returned(plugin, "sft_validate_config", problems, "a list of Problem")
            for problem in problems:
                if not isinstance(problem, Problem):
                    raise self._returned(
                        plugin, "sft_validate_config", problem, "sft.plugin.Problem items"
                    )
                found.append(problem)
        return found

    def prepare_tokenizer(self, tokenizer: Any, config: Config) -> None:
        self._each("sft_prepare_tokenizer", tokenizer=tokenizer, config=config)

    def patch_model(self, model: Any, config: Config) -> None:
        self._each("sft_patch_model", model=model, config=config)

    def trainer_callbacks(self, config: Config) -> list[Any]:
        from transformers import TrainerCallback

        found = []
        for plugin, group in self._each("sft_trainer_callbacks", config=config):
            for callback in group or ():
                is_class = isinstance(callback, type) and issubclass(callback, TrainerCallback)
                if not (is_class or isinstance(callback, TrainerCallback)):
                    raise self._returned(
                        plugin, "sft_trainer_callbacks", callback, "TrainerCallback instances"
                    )
                found.append(callback)
        return found

    def train_start(self, config: Config, trainer: Any) -> None:
        self._each("sft_train_start", config=config, trainer=trainer)

    def train_end(self, config: Config, trainer: Any, metrics: dict[str, float]) -> None:
        self._each("sft_train_end", config=config, trainer=trainer, metrics=metrics)

    def save_checkpoint(self, config: Config, trainer: Any, checkpoint_dir: str) -> None:
        self._each(
            "sft_save_checkpoint", config=config, trainer=trainer, checkpoint_dir=checkpoint_dir
        )

    def resume_checkpoint(self, config: Config, trainer: Any, checkpoint_dir: str) -> None:
        self._each(
            "sft_resume_checkpoint", config=config, trainer=trainer, checkpoint_dir=checkpoint_dir
        )

    def before_save(self, config: Config, model: Any, output_dir: str, trainer: Any = None) -> None:
        self._each(
            "sft_before_save", config=config, model=model, output_dir=output_dir, trainer=trainer
        )

    def save_model(
        self, config: Config, model: Any, tokenizer: Any, output_dir: str, trainer: Any = None
    ) -> str | None:
        """The first implementation that saves (returns a description) wins (firstresult)."""
        kwargs = {
            "config": config,
            "model": model,
            "tokenizer": tokenizer,
            "output_dir": output_dir,
            "trainer": trainer,
        }
        for plugin, saved in self._each("sft_save_model", first_result=True, **kwargs):
            if not isinstance(saved, str):
                raise self._returned(plugin, "sft_save_model", saved, "a str or None")
            return saved
        return None

    def after_save(self, config: Config, output_dir: str) -> None:
        self._each("sft_after_save", config=config, output_dir=output_dir)

    # -- introspection for `sft plugins list` -------------------------------------------------

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.manager.get_plugin(name)
        if plugin is None:
            return []
        return sorted(caller.name for caller in self.manager.get_hookcallers(plugin) or [])

    def provides(self) -> tuple[dict[str, dict[str, list[str]]], dict[str, str]]:
        """What each plugin provides ({plugin: {kind: [names]}}) and conflicts ({plugin: error})."""
        provided: dict[str, dict[str, list[str]]] = {}
        conflicts: dict[str, str] = {}
        for kind in KINDS:
            registry = self.registry(kind)
            for name, _ in registry.items():
                provided.setdefault(registry.owner(name), {}).setdefault(kind, []).append(name)
            for conflict in registry.conflicts.values():
                if conflict.plugin:
                    conflicts[conflict.plugin] = str(conflict)
        claimants: dict[tuple[str, str], list[str]] = {}
        for plugin, keys in self.config_keys(strict=False):
            names = [field.name for field in attrs.fields(keys.cls)]
            label = "config keys" if keys.scope == "root" else "dataset keys"
            provided.setdefault(plugin, {}).setdefault(label, []).extend(names)
            for name in names:
                claimants.setdefault((keys.scope, name), []).append(plugin)
        core_keys = {scope: _core_keys(scope) for scope in ("root", "dataset")}
        for (scope, name), claims in sorted(claimants.items()):
            if name in core_keys[scope]:
                claims = ["core", *claims]
            if len(claims) > 1:
                claims = sorted(claims, key=lambda plugin: (plugin != "core", plugin))
                message = (
                    f"config key {name!r} is declared by both "
                    f"{' and '.join(repr(c) for c in claims)}: a config that sets it is refused "
                    "(configs that do not set it are unaffected)"
                )
                for plugin in claims:
                    if plugin != "core":
                        conflicts[plugin] = "; ".join(
                            filter(None, [conflicts.get(plugin), message])
                        )
        return provided, conflicts


def _core_keys(scope: str) -> set[str]:
    from sft.config.schema import Config, DatasetConfig

    return set(attrs.fields_dict(Config if scope == "root" else DatasetConfig))


_loaded: SftPlugins | None = None


def get_plugins() -> SftPlugins:
    """The process-wide plugins, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = SftPlugins.load()
    return _loaded


def set_plugins(plugins: SftPlugins | None) -> None:
    """Replace (or with `None`, forget) the process-wide plugins; for tests and notebooks."""
    global _loaded
    _loaded = plugins


def hook_names() -> Sequence[str]:
    return _spec_names()
