"""The cattrs converter for config objects (structure plugin key groups, dump resolved configs)."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

import attrs
import cattrs

converter = cattrs.Converter(forbid_extra_keys=True)


def _plain_union(tp: Any) -> bool:
    """A union of plain types (`str | dict[str, Any] | None`), which cattrs cannot structure."""
    if get_origin(tp) not in (Union, types.UnionType):
        return False
    return not any(attrs.has(get_origin(arg) or arg) for arg in get_args(tp))


# The loader has already checked and normalised each value against its type (`conform`).
converter.register_structure_hook_func(_plain_union, lambda value, _: value)


def to_dict(config: Any) -> dict[str, Any]:
    """A config (or dataset entry) as plain data, plugin sections flattened in, for dumping."""
    data: dict[str, Any] = {}
    for field in attrs.fields(type(config)):
        if field.name.startswith("_"):
            continue
        value = getattr(config, field.name)
        if isinstance(value, tuple) and value and attrs.has(type(value[0])):
            data[field.name] = [to_dict(item) for item in value]
        else:
            data[field.name] = converter.unstructure(value)
    for section in getattr(config, "_sections", {}).values():
        data.update(converter.unstructure(section))
    return data
