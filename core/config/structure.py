"""Turn raw config values into typed values, collecting a readable problem for each mismatch."""

from __future__ import annotations

import contextlib
import functools
import math
import types
from typing import Any, Literal, Union, get_args, get_origin

import attrs


class Mismatch(Exception):
    """A value does not fit its declared type; the message says what was expected."""


def describe_type(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(_literal(a) for a in args)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    if origin is dict or tp is dict:
        return "a table (key = value pairs)"
    if attrs.has(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _literal(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


def _plural(tp: Any) -> str:
    text = describe_type(tp)
    return {"a string": "strings", "an integer": "integers", "a number": "numbers"}.get(text, text)


def describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {_literal(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def conform(value: Any, tp: Any) -> Any:
    """Check `value` against type `tp` strictly and return it normalised (lists → tuples)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise Mismatch("null")
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and value is not None:
            return conform(value, options[0])  # its own, more precise, message
        for option in sorted(args, key=_union_order):
            try:
                return conform(value, option)
            except Mismatch:
                continue
        raise Mismatch(describe_type(tp))
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise Mismatch(describe_type(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch(describe_type(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Mismatch(describe_type(tp))
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string; Axolotl users write it
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise Mismatch("a finite number" if number is not None else describe_type(tp))
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch(describe_type(tp))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise Mismatch(describe_type(tp))
        items = []
        for index, item in enumerate(value):
            try:
                items.append(conform(item, args[0]))
            except Mismatch as exc:
                raise Mismatch(f"{describe_type(tp)} (item {index} should be {exc})") from None
        return tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise Mismatch(describe_type(tp))
        value_type = args[1] if args else Any
        result = {}
        for name, item in value.items():
            try:
                result[str(name)] = conform(item, value_type)
            except Mismatch as exc:
                raise Mismatch(f"{describe_type(tp)} ({name!r} should be {exc})") from None
        return result
    raise TypeError(f"config type {tp!r} is not supported by the config loader")


def _union_order(tp: Any) -> int:
    # Try exact kinds before lenient ones (a str must not be read as a float first).
    return {type(None): 0, bool: 1, int: 2, str: 3, float: 4}.get(tp, 5)


@functools.cache
def resolved_fields(cls: type) -> tuple[attrs.Attribute, ...]:  # type: ignore[type-arg]
    attrs.resolve_types(cls)
    return tuple(f for f in attrs.fields(cls) if not f.name.startswith("_"))


def check_bounds(field: attrs.Attribute, value: Any) -> str | None:  # type: ignore[type-arg]
    """A message when a numeric value is outside the field's declared bounds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    meta = field.metadata
    if meta.get("ge") is not None and value < meta["ge"]:
        return f"must be ≥ {meta['ge']:g}, found {value:g}"
    if meta.get("gt") is not None and value <= meta["gt"]:
        return f"must be > {meta['gt']:g}, found {value:g}"
    if meta.get("le") is not None and value > meta["le"]:
        return f"must be ≤ {meta['le']:g}, found {value:g}"
    return None
