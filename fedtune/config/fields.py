"""Flat config values: the scalar type, key <-> attribute names, type checks, and TOML parsing."""

from __future__ import annotations

import json
import tomllib
import types
import typing
from typing import Any, Literal

from fedtune.core.errors import ConfigError

Scalar = bool | int | float | str


def require(ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"`{key}` {msg}")


def key_of(attr: str) -> str:
    return attr.replace("_", "-")


def attr_of(key: str) -> str:
    return key.replace("-", "_")


_HINTS: dict[str, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    # get_type_hints re-evaluates every annotation string (slow); from_flat asks once per key.
    if cls.__qualname__ not in _HINTS:
        _HINTS[cls.__qualname__] = typing.get_type_hints(cls)
    return _HINTS[cls.__qualname__]


def coerce(key: str, value: Any, ftype: Any) -> Any:
    """Check ``value`` against the field type; ints widen to floats, and a number given for a string field becomes
    its text (``--set simulation.site-delays=2`` parses as TOML's 2); nothing else converts."""
    if typing.get_origin(ftype) is Literal:
        choices = typing.get_args(ftype)
        require(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    if ftype is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}.")
        return value
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):  # bool | Literal[...]
        words = [w for arg in typing.get_args(ftype) if typing.get_origin(arg) is Literal for w in typing.get_args(arg)]
        ok = isinstance(value, bool) or (isinstance(value, str) and value in words)
        require(ok, key, f"must be true or false (or {' / '.join(map(json.dumps, words))}), got {value!r}.")
        return value
    if ftype is int:
        require(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}.",
        )
        return value
    if ftype is float:
        require(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}.",
        )
        return float(value)
    if ftype is str:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        require(isinstance(value, str) or number, key, f"must be a string, got {value!r}.")
        return str(value)
    raise AssertionError(f"unsupported field type {ftype!r} for {key}")


def toml_scalar(value: Scalar) -> str:
    """A scalar as a TOML value (what Flower parses in app config, run config and node config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def parse_value(text: str) -> Scalar:
    """Parse a ``--set`` value as a TOML scalar (``8``, ``1e-3``, ``true``, ``"x"``), else a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, bool | int | float | str):
        return value
    return text


def parse_assignments(items: list[str]) -> dict[str, Scalar]:
    """Turn ``["k=v", ...]`` into a flat dict; a malformed item raises naming it."""
    out: dict[str, Scalar] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"`--set {item}` must have the form key=value.")
        out[key.strip()] = parse_value(text.strip())
    return out
