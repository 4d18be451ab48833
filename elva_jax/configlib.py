"""Typed, validated configs: nested frozen dataclasses filled from YAML and `key.sub=value` overrides.

- An unknown or misspelt key is an error that names the closest valid key.
- Values are checked against the field's type (int, float, bool, str, tuple, Optional, Literal-like
  `choices` in field metadata) and converted where it is lossless (int -> float, list -> tuple).
- `to_dict` gives the fully resolved config that a run directory records.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml

from elva_jax.errors import UserError

_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


#: a field's ``metadata["fingerprint"]``: the checkpoint kinds (stage keys, `runtime.fingerprint`) whose saved step and
#: data position change meaning when the field changes; FINGERPRINT_ALL marks a field of every kind
FINGERPRINT_ALL = "*"


class ConfigError(UserError, ValueError):
    """A config key or value that does not fit the schema."""


def _closest(name: str, options) -> str:
    m = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else f" (valid keys: {', '.join(sorted(options))})"


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string: a number written that way is still a number
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a (partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"{where}: unknown key {k!r}{_closest(k, fields)}")
        sub = f"{where}.{k}"
        val = _convert(v, hints[k], sub)
        choices = fields[k].metadata.get("choices")
        if choices is not None and val not in choices:
            raise ConfigError(f"{sub}: {val!r} is not one of {list(choices)}")
        kwargs[k] = val
    for name, f in fields.items():
        if name in kwargs:
            continue
        choices = f.metadata.get("choices")
        if f.default is not dataclasses.MISSING and choices is not None and f.default not in choices:
            raise ConfigError(f"{where}.{name}: default {f.default!r} is not one of {list(choices)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_copy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def _deep_copy(d):
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load(cls, path: str | None = None, overrides: list[str] | None = None):
    """Config from an optional YAML file plus overrides; errors name the file."""
    data: dict = {}
    if path:
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple | list):
            return [conv(v) for v in x]
        return x

    return conv(cfg)
