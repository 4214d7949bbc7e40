"""Named component registries, one per component kind, remembering who registered what."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

import attrs

from sft.errors import PluginError, SftError

T = TypeVar("T")


@attrs.frozen
class Kind:
    """A component kind: the registration hook that fills it and how users select from it."""

    name: str
    hook: str
    selected_by: str


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("prompt_strategies", "sft_register_prompt_strategies", "datasets[].type"),
        Kind("packers", "sft_register_packers", "sample_packing"),
        Kind("attention_backends", "sft_register_attention_backends", "attn_implementation"),
        Kind("kernels", "sft_register_kernels", "(plugin config keys)"),
        Kind("optimizers", "sft_register_optimizers", "optimizer"),
        Kind("distributed_backends", "sft_register_distributed_backends", "(plugin config keys)"),
        Kind("objectives", "sft_register_objectives", "objective"),
    )
}


class UnknownComponentError(SftError):
    """A config names a component that no installed plugin provides."""

    exit_code = 4
    title = "config error"


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """The closest choice to a misspelt name, if any is close enough."""
    matches = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


class Registry(Generic[T]):
    """Components of one kind, keyed by name (aliases included), each with its plugin."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._components: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        self.conflicts: dict[str, PluginError] = {}  # name → the error naming both plugins
        self.broken_plugins: dict[str, str] = {}

    def add(self, component: T, plugin: str) -> None:
        name = component.name  # type: ignore[attr-defined]
        for label in (name, *getattr(component, "aliases", ())):
            owner = self._owners.get(label) or self._owners.get(self._aliases.get(label, ""))
            if owner is not None:
                self.conflicts[label] = PluginError(
                    f"{self.kind.name}: {label!r} is registered by both plugin {owner!r} and "
                    f"plugin {plugin!r}; uninstall or disable one (SFT_DISABLE_PLUGINS={plugin})",
                    plugin=plugin,
                )
                return
        self._components[name] = component
        self._owners[name] = plugin
        for alias in getattr(component, "aliases", ()):
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        return self._aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) in self._components

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._components))

    def __len__(self) -> int:
        return len(self._components)

    def names(self) -> list[str]:
        return sorted(self._components)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._components[name]) for name in self.names()]

    def owner(self, name: str) -> str:
        return self._owners[self.canonical(name)]

    def unknown_message(self, name: str) -> str:
        """Explain that `name` is not registered: the installed choices and a did-you-mean."""
        choices = self.names()
        text = f"unknown {self.kind.selected_by} {name!r}"
        guess = did_you_mean(name, [*choices, *self._aliases])
        text += f"; did you mean {guess!r}?" if guess else "."
        text += f" Installed: {', '.join(choices) if choices else '(none)'}."
        if self.broken_plugins:
            broken = ", ".join(f"{p} ({err})" for p, err in sorted(self.broken_plugins.items()))
            text += f" Plugins that failed to load and may provide it: {broken}."
        else:
            text += " A plugin providing it may need to be installed (see `sft plugins list`)."
        return text

    def get(self, name: str) -> T:
        """The component `name`; a conflict over another name does not affect this one."""
        if name in self.conflicts or self.canonical(name) in self.conflicts:
            raise self.conflicts.get(name) or self.conflicts[self.canonical(name)]
        try:
            return self._components[self.canonical(name)]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(name)) from None
