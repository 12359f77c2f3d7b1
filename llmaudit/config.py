"""Module configs: ``--set key=value`` overrides parsed by the dataclass field's type.

Every module has a dataclass config with ``toy()`` and ``full()`` presets. Overrides are validated
here so that a typo is an error naming the valid keys, never a silently ignored flag.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

TRUE = {"true", "1", "yes", "on", "y", "t"}
FALSE = {"false", "0", "no", "off", "n", "f"}


class ConfigError(ValueError):
    """A bad --set: unknown key, unparsable value, or a value the module's config rejects."""


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["lam=0.9", "gamma=1"]`` -> ``{"lam": "0.9", "gamma": "1"}``; later assignments win."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key] = value.strip()
    return out


def field_types(config_cls: type) -> dict[str, Any]:
    hints = get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if f.init}


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        return f"comma-separated {type_name(args[0])}s" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def parse_value(raw: str, tp: Any, key: str = "value") -> Any:
    """Parse ``raw`` as type ``tp`` (bool, int, float, str, Literal, Optional, tuple[X, ...])."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and raw.lower() in {"none", "null", ""}:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={raw!r}: expected {type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise ConfigError(f"{key}={raw!r}: expected one of {', '.join(map(str, choices))}")
    if origin is tuple:
        args = get_args(tp)
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return tuple(parse_value(p, args[0], key) for p in parts)
    if tp is bool:
        low = raw.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise ConfigError(f"{key}={raw!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    if tp is str:
        return raw
    raise ConfigError(f"{key}: fields of type {type_name(tp)} cannot be set from the command line")


def apply_overrides(config: Any, overrides: dict[str, str]) -> Any:
    """A copy of ``config`` with ``overrides`` applied; unknown keys and bad values raise ConfigError."""
    types_ = field_types(type(config))
    parsed: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            valid = ", ".join(f"{n} ({type_name(t)})" for n, t in types_.items())
            raise ConfigError(f"unknown config key {key!r} for {type(config).__name__}.{hint} "
                              f"Valid keys: {valid}")
        parsed[key] = parse_value(raw, types_[key], key)
    try:
        return dataclasses.replace(config, **parsed)
    except (ValueError, TypeError) as exc:  # the config's own __post_init__ validation
        raise ConfigError(f"{type(config).__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
