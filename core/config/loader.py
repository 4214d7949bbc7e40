"""Load a TOML or YAML config into a `Config`, reporting every problem at once."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import yaml

from sft.components import ConfigKeys
from sft.config import axolotl
from sft.config.locate import KeyPath, format_path, line_of, toml_lines, yaml_lines
from sft.config.schema import Config, DatasetConfig, is_planned
from sft.config.structure import Mismatch, check_bounds, conform, describe_value, resolved_fields
from sft.errors import ConfigError, Problem, UsageError
from sft.registry import did_you_mean

if TYPE_CHECKING:
    from sft.manager import SftPlugins

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_DATASET_LISTS = ("datasets", "test_datasets")


@attrs.define
class _Context:
    """Where values came from, and the problems (errors) and warnings found so far."""

    lines: dict[KeyPath, int]
    source: str | None
    overridden: set[KeyPath] = attrs.field(factory=set)
    problems: list[Problem] = attrs.field(factory=list)
    # Keys that change nothing (`Problem.warning`): they never stop a load, and reach the
    # config's warnings with those `check_config` finds.
    warnings: list[Problem] = attrs.field(factory=list)
    # A top-level key read under another name (Axolotl's `pretraining_dataset` as `datasets`):
    # the name sft reads -> the name the file uses, for messages and their lines.
    written_as: dict[str, str] = attrs.field(factory=dict)

    def add(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.problems.append(self._problem(path, message, hint))

    def warn(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.warnings.append(attrs.evolve(self._problem(path, message, hint), warning=True))

    def _as_written(self, path: KeyPath) -> KeyPath:
        if path and isinstance(path[0], str) and path[0] in self.written_as:
            return (self.written_as[path[0]], *path[1:])
        return path

    def _problem(self, path: KeyPath, message: str, hint: str | None) -> Problem:
        path = self._as_written(path)
        if path in self.overridden:
            return Problem(format_path(path), message, file="--set", hint=hint)
        return Problem(format_path(path), message, line=line_of(self.lines, path), hint=hint)

    def locate(self, problem: Problem) -> Problem:
        """Fill in the line of a plugin's problem from its key path."""
        if problem.line is not None or not problem.path:
            return problem
        path = self._as_written(_parse_path(problem.path))
        problem = attrs.evolve(problem, path=format_path(path))
        if path in self.overridden:
            return attrs.evolve(problem, file="--set")
        return attrs.evolve(problem, line=line_of(self.lines, path))


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse a config file by its extension: .toml, or .yaml/.yml."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {file}")
    text = file.read_text(encoding="utf-8")
    return parse_config_text(
        text, "yaml" if file.suffix in (".yaml", ".yml") else "toml", str(file)
    )


# A YAML alias re-uses an anchored node: a few hundred bytes of anchors and aliases can stand
# for billions of values ("billion laughs"), which everything that walks the config (line
# numbers, checks, the saved config) would expand. Configs rarely use anchors, and a real one
# holds a few hundred values; one that expands to more than this is refused.
MAX_YAML_VALUES = 100_000


class YamlRefused(Exception):
    """YAML that sft will not load: aliases expanding too far, too deep, or an unreadable value."""


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, bounded: refuse (`YamlRefused`) what would expand past `MAX_YAML_VALUES`
    values through aliases, recursive aliases, nesting past the recursion limit, and values
    the safe constructor cannot build (an over-long integer, an impossible date)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except RecursionError:
        raise YamlRefused("nested too deeply to read") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise YamlRefused(
                f"an integer longer than {sys.get_int_max_str_digits()} digits"
            ) from None
        raise YamlRefused(f"cannot read a value: {exc}") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Count the values `root` stands for with every alias expanded, without expanding it:
    each node's count is computed once (iteratively, so deep nesting cannot overflow)."""
    counts: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are being counted: their ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if children_done:
            open_nodes.discard(key)
            counts[key] = 1 + sum(counts[id(child)] for child in children)
            if counts[key] > MAX_YAML_VALUES:
                raise YamlRefused(
                    f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; "
                    "write the values out instead of nesting aliases"
                )
            continue
        if key in counts:
            continue  # an alias of a node already counted
        if key in open_nodes:
            raise YamlRefused("an alias (*name) refers to a node that contains it (a cycle)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children)


def parse_config_text(
    text: str, fmt: str, source: str = "<text>"
) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    if fmt == "yaml":
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError([Problem("", f"invalid YAML: {exc}")], source) from None
        except YamlRefused as exc:
            raise ConfigError([Problem("", f"YAML refused: {exc}")], source) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                [Problem("", "the top level of a config must be a mapping of keys")], source
            )
        return data, yaml_lines(text)
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError([Problem("", f"invalid TOML: {_toml_problem(exc)}")], source) from None
    return data, toml_lines(text)


def _toml_problem(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    if "integer string conversion" in str(exc):
        return f"an integer longer than {sys.get_int_max_str_digits()} digits"
    return str(exc)


def _parse_path(text: str) -> KeyPath:
    parts: list[str | int] = []
    for chunk in text.replace("[", ".").replace("]", "").split("."):
        if chunk:
            parts.append(int(chunk) if chunk.isdigit() else chunk)
    return tuple(parts)


def parse_override_value(raw: str) -> Any:
    """A `--set` value: TOML syntax first (`{pad_token = "x"}`, `[1, 2]`, `1e-4`), then YAML,
    then the plain string."""
    if not raw.strip():
        return ""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except (ValueError, RecursionError):  # not TOML, or a value TOML cannot hold: try YAML
        pass
    try:
        return load_yaml(raw)  # raises YamlRefused, reported by apply_overrides
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> set[KeyPath]:
    """Apply `--set key=value` overrides in place; the value is read as a YAML scalar/list."""
    touched: set[KeyPath] = set()
    for override in overrides:
        name, sep, raw = override.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set expects key=value, got {override!r}")
        path = _parse_path(name.strip())
        try:
            value = parse_override_value(raw)
        except YamlRefused as exc:
            raise UsageError(f"--set {name}: value refused: {exc}") from None
        target: Any = data
        for depth, part in enumerate(path):
            here = format_path(path[: depth + 1])
            if isinstance(part, int):
                if not isinstance(target, list) or not 0 <= part < len(target):
                    raise UsageError(f"--set {name}: {here} does not exist")
            elif not isinstance(target, dict):
                raise UsageError(f"--set {name}: {format_path(path[:depth])} is not a table")
            if depth == len(path) - 1:
                target[part] = value
            elif isinstance(part, int):
                target = target[part]
            else:
                if part not in target:
                    target[part] = [] if isinstance(path[depth + 1], int) else {}
                target = target[part]
        touched.add(path)
    return touched


def _groups(plugins: SftPlugins, scope: str) -> list[tuple[str, type]]:
    core = Config if scope == "root" else DatasetConfig
    groups: list[tuple[str, type]] = [("core", core)]
    entries: list[tuple[str, ConfigKeys]] = plugins.config_keys() if plugins is not None else []
    for plugin, keys in entries:
        if keys.scope == scope:
            groups.append((plugin, keys.cls))
    return groups


def _dataset_group_types(plugins: SftPlugins) -> dict[type, tuple[str, tuple[str, ...]]]:
    """Dataset key group → (owning plugin, the dataset types it applies to); absent: every type."""
    if plugins is None:
        return {}
    strategies = plugins.prompt_strategies()
    registered: dict[str, list[str]] = {}
    for name, _ in strategies.items():
        registered.setdefault(strategies.owner(name), []).append(name)
    scoped: dict[type, tuple[str, tuple[str, ...]]] = {}
    for plugin, keys in plugins.config_keys():
        if keys.scope != "dataset":
            continue
        types = keys.dataset_types if keys.dataset_types is not None else registered.get(plugin)
        if types:
            scoped[keys.cls] = (plugin, tuple(types))
    return scoped


def _is_blank(value: Any) -> bool:
    return value is None or value == ""


def _structure_scope(
    data: dict[str, Any],
    groups: list[tuple[str, type]],
    prefix: KeyPath,
    ctx: _Context,
    unsupported: Mapping[str, Any],
) -> dict[type, dict[str, Any]]:
    owners: dict[str, tuple[str, type, attrs.Attribute]] = {}  # type: ignore[type-arg]
    claimants: dict[str, list[str]] = {}
    for plugin, cls in groups:
        for field in resolved_fields(cls):
            claimants.setdefault(field.name, []).append(plugin)
            owners.setdefault(field.name, (plugin, cls, field))
    # A key two plugins declare blocks only the configs that set it: which plugin would read
    # the value is ambiguous there, and nowhere else.
    for name, claims in claimants.items():
        if len(claims) > 1 and not _is_blank(data.get(name)):
            claims = sorted(claims, key=lambda plugin: (plugin != "core", plugin))
            both = " and ".join(repr(plugin) for plugin in claims)
            disable = next(plugin for plugin in claims if plugin != "core")
            ctx.add(
                (*prefix, name),
                f"key is declared by both {both}, so it is ambiguous which one reads it",
                hint=f"disable one of them (e.g. SFT_DISABLE_PLUGINS={disable}), or remove the key",
            )

    for name, value in data.items():
        if not isinstance(name, str):
            ctx.add((*prefix, str(name)), f"keys must be names, found {describe_value(name)}")
            continue
        if name in owners:
            continue
        path = (*prefix, name)
        if name in axolotl.IGNORED_ROOT_KEYS and not prefix:
            continue
        if name in unsupported:
            dataset = bool(prefix)
            if axolotl.is_inert(value, name, dataset=dataset):
                continue
            if idle := axolotl.no_effect_message(name, data, dataset=dataset):
                ctx.warn(path, *idle)  # set, yet changes nothing: said, not refused
            else:
                ctx.add(path, *axolotl.unsupported_message(name, dataset=dataset))
            continue
        if not prefix and name in axolotl.NOT_AXOLOTL_KEYS:
            ctx.warn(
                path,
                "has no effect: not a key of Axolotl either (Axolotl drops it unread, so it "
                "never did anything there)",
                hint=axolotl.NOT_AXOLOTL_KEYS[name],
            )
            continue
        guess = did_you_mean(name, list(owners))
        ctx.add(path, "unknown key" + (f"; did you mean {guess!r}?" if guess else ""))

    values: dict[type, dict[str, Any]] = {cls: {} for _, cls in groups}
    for name, (_, cls, field) in owners.items():
        path = (*prefix, name)
        value = data.get(name)
        if len(claimants[name]) > 1:
            continue  # reported above when set; every claimant reads its default
        if (
            _is_blank(value)  # absent or blank (`fp16:` in YAML): the default
            or (value == 0 and not prefix and name in axolotl.ZERO_IS_BLANK)  # Axolotl's "none"
        ):
            if field.default is attrs.NOTHING:
                ctx.add(path, "required key is missing" if name not in data else "is blank")
            continue
        if name in _DATASET_LISTS and cls is Config:
            values[cls][name] = value  # structured by the caller, entry by entry
            continue
        try:
            value = conform(value, field.type)
        except Mismatch as exc:
            ctx.add(path, f"expected {exc}, found {describe_value(value)}")
            continue
        if message := check_bounds(field, value):
            ctx.add(path, message)
            continue
        if is_planned(field) and value != field.default:
            ctx.add(
                path,
                "is not supported by sft yet (its feature has not landed)",
                hint=f"remove it or set it to its default ({field.default!r})",
            )
            continue
        values[cls][name] = value
    return values


def _structure_datasets(
    raw: Any, key: str, plugins: SftPlugins, ctx: _Context
) -> tuple[DatasetConfig, ...]:
    path: KeyPath = (key,)
    if not isinstance(raw, list):
        ctx.add(path, f"expected a list of dataset tables ([[{key}]]), found {describe_value(raw)}")
        return ()
    groups = _groups(plugins, "dataset")
    strategies = plugins.prompt_strategies() if plugins is not None else None
    group_types = _dataset_group_types(plugins)
    scoped = {
        field.name: owner for cls, owner in group_types.items() for field in attrs.fields(cls)
    }
    result = []
    for index, entry in enumerate(raw):
        entry_path = (*path, index)
        if not isinstance(entry, dict):
            ctx.add(entry_path, f"expected a dataset table, found {describe_value(entry)}")
            continue
        values = _structure_scope(entry, groups, entry_path, ctx, axolotl.UNSUPPORTED_DATASET_KEYS)
        kind = values[DatasetConfig].get("type")
        kinds = {kind, strategies.canonical(kind) if strategies and isinstance(kind, str) else kind}
        if isinstance(kind, str) and kind.startswith("sharegpt"):
            ctx.add(
                (*entry_path, "type"),
                f"{kind!r} is Axolotl's removed ShareGPT type (Axolotl refuses it too)",
                hint="use type = 'chat_template' with field_messages = 'conversations' and "
                "message_property_mappings = {role = 'from', content = 'value'}",
            )
        elif kind is not None and strategies is not None and kind not in strategies:
            ctx.add((*entry_path, "type"), strategies.unknown_message(kind))
        else:
            _check_key_types(entry, kind, kinds, scoped, entry_path, ctx)
        # A dataset carries the key groups of its own type only (and its resolved config lists
        # only those): another type's keys are refused above.
        own = [
            (plugin, cls)
            for plugin, cls in groups
            if cls not in group_types or kinds & set(group_types[cls][1])
        ]
        try:
            result.append(_build(DatasetConfig, values, own))
        except (TypeError, ValueError):
            continue  # its problems are already recorded
    return tuple(result)


def _check_key_types(
    entry: dict[str, Any],
    kind: str | None,
    kinds: set[str | None],
    scoped: dict[str, tuple[str, tuple[str, ...]]],
    path: KeyPath,
    ctx: _Context,
) -> None:
    """Format keys belong to their dataset types: `field_instruction` on a chat_template
    dataset would be accepted and never read. `kinds`: the type as written and canonical."""
    for name, value in entry.items():
        if name not in scoped or _is_blank(value):
            continue
        plugin, types = scoped[name]
        if kinds & set(types):
            continue
        names = ", ".join(repr(t) for t in types[:4])
        if len(types) > 4:
            names += f" and {len(types) - 4} more (`sft plugins list`)"
        here = f"type {kind!r}" if kind is not None else "pre-tokenized rows (no type)"
        ctx.add(
            (*path, name),
            f"belongs to dataset type {names} (plugin {plugin}), and this dataset has {here}: "
            "it would have no effect",
            hint=f"remove {name}, or set type = {types[0]!r} if that is the dataset's format",
        )


def _build(core: type, values: dict[type, dict[str, Any]], groups: list[tuple[str, type]]) -> Any:
    from sft.config.convert import converter

    sections = {cls: converter.structure(values[cls], cls) for _, cls in groups if cls is not core}
    return core(**values[core], _sections=sections)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    plugins: SftPlugins | None = None,
    machine_checks: bool = True,
) -> Config:
    """Load and fully validate a config file; raise `ConfigError` listing every problem.

    `machine_checks = False` skips what depends on this machine (a GPU, an installed kernel
    package): for checking a GPU config on a laptop.
    """
    data, lines = read_config_file(path)
    return _load(data, lines, str(path), overrides, plugins, machine_checks)


def load_config_text(
    text: str,
    fmt: str = "toml",
    overrides: Sequence[str] = (),
    plugins: SftPlugins | None = None,
    source: str = "<text>",
    machine_checks: bool = True,
) -> Config:
    """Like `load_config`, from a string."""
    data, lines = parse_config_text(text, fmt, source)
    return _load(data, lines, source, overrides, plugins, machine_checks)


def _read_pretraining_dataset(data: dict[str, Any], ctx: _Context) -> None:
    """Axolotl's `pretraining_dataset`: its entries are the training datasets, streamed.

    Entries default to `type: pretrain` (the text of `text_column`, all trained), as in Axolotl;
    `pretrain_multipack_buffer_size` is the streaming buffer.
    """
    entries = data.pop("pretraining_dataset", None)
    if axolotl.is_inert(entries):
        return  # pretrain_multipack_buffer_size alone changes nothing: a warning, later
    buffer = data.pop("pretrain_multipack_buffer_size", None)
    if not axolotl.is_inert(data.get("datasets")):
        ctx.add(
            ("pretraining_dataset",),
            "is set together with datasets; a run trains on one or the other",
            hint="move every entry to pretraining_dataset (streamed) or to datasets (prepared "
            "and cached)",
        )
        return
    if isinstance(entries, dict):  # one table instead of a list of them
        entries = [entries]
    if isinstance(entries, list):
        entries = [
            {**e, "type": e.get("type") or "pretrain"} if isinstance(e, dict) else e
            for e in entries
        ]
    data["datasets"] = entries
    ctx.written_as["datasets"] = "pretraining_dataset"
    if data.get("streaming") is False:
        ctx.add(
            ("streaming",),
            "is false, but pretraining_dataset is always streamed",
            hint="remove streaming = false, or list the entries under datasets to prepare them",
        )
        return
    data["streaming"] = True
    if buffer is not None and data.get("streaming_multipack_buffer_size") is None:
        data["streaming_multipack_buffer_size"] = buffer


def _read_old_tokens_table(data: dict[str, Any], ctx: _Context) -> None:
    """Axolotl's older `tokens:` table of special tokens (`pad_token: ...`), read as
    `special_tokens`; `tokens` is now the list of tokens to add."""
    from sft.config.checks import SPECIAL_TOKEN_ROLES

    table = data.get("tokens")
    if not isinstance(table, dict) or not table or not set(table) <= set(SPECIAL_TOKEN_ROLES):
        return  # a list, or a table of other keys: the type check says what `tokens` takes
    if not axolotl.is_inert(data.get("special_tokens")):
        ctx.add(
            ("tokens",),
            "is a table of special tokens (Axolotl's older spelling of special_tokens) beside "
            "special_tokens",
            hint="move its entries into special_tokens",
        )
        del data["tokens"]  # said once, not again as a type mismatch
        return
    data["special_tokens"] = data.pop("tokens")
    ctx.written_as["special_tokens"] = "tokens"


def _load(
    data: dict[str, Any],
    lines: dict[KeyPath, int],
    source: str,
    overrides: Sequence[str],
    plugins: SftPlugins,
    machine_checks: bool = True,
) -> Config:
    if plugins is None:
        from sft.manager import SftPlugins

        plugins = SftPlugins.load()
    ctx = _Context(lines=lines, source=source)
    ctx.overridden = apply_overrides(data, overrides)
    _read_pretraining_dataset(data, ctx)
    _read_old_tokens_table(data, ctx)
    groups = _groups(plugins, "root")
    values = _structure_scope(data, groups, (), ctx, axolotl.UNSUPPORTED_ROOT_KEYS)
    for key in _DATASET_LISTS:
        if key in values[Config]:
            values[Config][key] = _structure_datasets(values[Config][key], key, plugins, ctx)

    from sft.config.checks import check_selections

    check_selections(values[Config], plugins, ctx.add)
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    config: Config = _build(Config, values, groups)
    object.__setattr__(config, "_source", source)
    object.__setattr__(config, "_plugin_set", plugins)
    object.__setattr__(
        config, "_blank", frozenset(k for k, v in data.items() if v is None or v == "")
    )
    if config.bfloat16 is True and config.bf16 == "auto":
        object.__setattr__(config, "bf16", True)  # Axolotl: bf16 = bf16 or bfloat16

    from sft.config.checks import check_config

    problems = [*check_config(config, plugins), *plugins.validate_config(config)]
    if not machine_checks:
        problems = [p for p in problems if not p.machine]
    errors = [ctx.locate(p) for p in problems if not p.warning]
    if errors:
        raise ConfigError(errors, source)
    # Warnings (keys that change nothing) ride on the config: `sft validate` and `sft run`
    # show them, in file order.
    warnings = sorted(
        [*ctx.warnings, *(ctx.locate(p) for p in problems if p.warning)],
        key=lambda p: (p.line is None, p.line or 0),
    )
    object.__setattr__(config, "_warnings", tuple(warnings))
    return config
