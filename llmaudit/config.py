"""Module configs: ``--set key=value`` overrides parsed by the dataclass field's type.

Every module has a dataclass config with ``toy()`` and ``full()`` presets. Overrides are validated
here so that a typo is an error naming the valid keys, never a silently ignored flag, and a value
outside the field's declared range is an error naming the field, the value and the range.

Ranges are declared next to the fields, as a ``RANGES`` class attribute mapping each numeric field to
``">= 1"``, ``"> 0"``, ``"[0, 1]"``, ``"[0, 1)"``, ``"(-inf, inf)"`` (any finite number) and the like.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
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


_BOUND = r"\s*([-+]?(?:inf|\d+(?:\.\d*)?(?:e[-+]?\d+)?))\s*"
_INTERVAL = re.compile(rf"^([\[(]){_BOUND},{_BOUND}([\])])$", re.I)
_HALF_LINE = re.compile(rf"^(>=|>|<=|<){_BOUND}$", re.I)


def declared_ranges(config_cls: type) -> dict[str, str]:
    """Every ``RANGES`` entry of ``config_cls`` and its bases (a subclass may add or narrow)."""
    out: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        out.update(vars(klass).get("RANGES", {}))
    return out


def in_range(value: float, text: str) -> bool:
    """Whether a finite ``value`` lies in the range ``text`` (a ValueError if ``text`` is malformed)."""
    if not math.isfinite(value):
        return False
    interval, half = _INTERVAL.match(text.strip()), _HALF_LINE.match(text.strip())
    if interval:
        left, low, high, right = interval.groups()
        low, high = float(low), float(high)
        return (low <= value if left == "[" else low < value) and (value <= high if right == "]" else value < high)
    if half:
        op, bound = half.group(1), float(half.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    raise ValueError(f"malformed range {text!r}: expected '>= 1', '> 0', '[0, 1)' or the like")


def range_text(text: str) -> str:
    text = text.strip()
    if text == "(-inf, inf)":
        return "a finite number"
    return f"in {text}" if text[0] in "[(" else text


def check_range(config_cls: type, key: str, value: Any) -> None:
    """ConfigError unless ``value`` (a number, or each number of a tuple) is in ``key``'s declared range."""
    text = declared_ranges(config_cls).get(key)
    if text is None or isinstance(value, bool) or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, (int, float)) and not in_range(v, text):
            raise ConfigError(f"{key}={v!r} is out of range: {config_cls.__name__}.{key} must be {range_text(text)}")


def check_config(config: Any) -> None:
    """ConfigError for the first field of ``config`` outside its declared range."""
    for key in field_types(type(config)):
        check_range(type(config), key, getattr(config, key))


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
        check_range(type(config), key, parsed[key])  # before the config's own __post_init__ sees it
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
