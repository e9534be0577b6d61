"""The YAML binder, the ground floor of the package (it imports nothing of vldistill): plain data bound
to dataclasses with key and type checks, `a.b=c` overrides, nested defaults, and digests of plain data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Mapping, Union

import yaml


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message names the key."""


def plain_digest(payload: Any, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of plain data in canonical JSON (sorted keys; other
    values such as paths as their str): a fingerprint of a config, a run or a vocabulary."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, where)
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {' or '.join(map(_type_name, options))}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Fill dataclass `cls` from a mapping, checking keys and types, then run its `validate(where)`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {_join(where, key)!r}; allowed keys: {', '.join(names)}")
    obj = cls(**{k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()})
    if hasattr(obj, "validate"):
        try:
            obj.validate(where or "config")
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (3, 0.5, true, null, [1, 2])."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {assignment!r} has an empty key")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a mapping")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def over_defaults(cls: type, defaults: dict[str, Any], data: Any) -> Any:
    """`data` laid over a dataclass's defaults: nested dataclass fields merge, every other value replaces."""
    if not isinstance(data, Mapping):
        return data
    hints = typing.get_type_hints(cls)
    merged = dict(defaults)
    for key, value in data.items():
        field_type = hints.get(key)
        if dataclasses.is_dataclass(field_type) and isinstance(defaults.get(key), dict):
            merged[key] = over_defaults(field_type, defaults[key], value)
        else:
            merged[key] = value
    return merged
