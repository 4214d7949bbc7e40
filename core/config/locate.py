"""Line numbers of config keys, so every problem can point into the file.

tomllib and yaml.safe_load drop positions; this module recovers them: YAML through the
composed node tree, TOML with a small scanner that follows tables, arrays of tables and
dotted keys (values spanning lines are skipped over, not parsed).
"""

from __future__ import annotations

import re

import yaml

KeyPath = tuple[str | int, ...]

_TOML_TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_TOML_ARRAY_TABLE = re.compile(r"^\s*\[\[\s*([^\[\]]+?)\s*\]\]\s*(#.*)?$")
_TOML_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_dotted(text: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'""", text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def toml_lines(text: str) -> dict[KeyPath, int]:
    """Map each key path (e.g. ('datasets', 0, 'type')) to its 1-based line in a TOML text."""
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    array_counts: dict[KeyPath, int] = {}
    depth = 0
    in_multiline: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if in_multiline in raw:
                in_multiline = None
            continue
        if depth > 0:
            depth += _bracket_delta(raw)
            continue
        if match := _TOML_ARRAY_TABLE.match(raw):
            base = tuple(_split_dotted(match.group(1)))
            index = array_counts.get(base, -1) + 1
            array_counts[base] = index
            table = (*base, index)
            lines.setdefault(base, number)
            lines[table] = number
            continue
        if match := _TOML_TABLE.match(raw):
            table = _resolve_table(tuple(_split_dotted(match.group(1))), array_counts)
            lines[table] = number
            continue
        if match := _TOML_KEY.match(raw):
            path = (*table, *_split_dotted(match.group(1)))
            lines[path] = number
            rest = raw[match.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) == 1:
                    in_multiline = quote
            if not in_multiline:
                depth = _bracket_delta(rest)
    return lines


def _resolve_table(path: KeyPath, array_counts: dict[KeyPath, int]) -> KeyPath:
    # [datasets.roles] under [[datasets]] belongs to the latest array element.
    for cut in range(len(path) - 1, 0, -1):
        head = path[:cut]
        if head in array_counts:
            return (*head, array_counts[head], *path[cut:])
    return path


def _bracket_delta(text: str) -> int:
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'[^\']*\'', '""', text)
    text = text.split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def yaml_lines(text: str) -> dict[KeyPath, int]:
    """Map each key path to its 1-based line in a YAML text."""
    lines: dict[KeyPath, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*path, str(key_node.value))
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines[child] = item.start_mark.line + 1
                walk(item, child)

    if root is not None:
        walk(root, ())
    return lines


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of `path`, or of its nearest located parent."""
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
