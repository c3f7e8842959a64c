"""Typed configs: dataclasses filled from YAML (or dicts) with every key and type checked.

An unknown key or a wrong type is an OffsideError naming the key path and the file."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from offside.errors import OffsideError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, source: str = "<config>", path: str = "") -> T:
    if not isinstance(data, dict):
        raise OffsideError(f"{source}: {path or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise OffsideError(
            f"{source}: unknown key '{where}{unknown[0]}' (valid keys: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        default = fields[name].default_factory
        if isinstance(value, dict) and default is not dataclasses.MISSING and dataclasses.is_dataclass(hints[name]):
            value = deep_merge(dataclasses.asdict(default()), value)  # a partial section keeps the other defaults
        values[name] = _coerce(hints[name], value, source, f"{path}.{name}" if path else name)
    return cls(**values)


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, path) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, path)
    if origin is list:
        if not isinstance(value, list):
            raise OffsideError(f"{source}: '{path}' must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise OffsideError(f"{source}: '{path}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise OffsideError(f"{source}: '{path}' must be {hint.__name__}, got {value!r}")
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise OffsideError(f"{path}: cannot read config: {err}") from err
    if not isinstance(data, dict):
        raise OffsideError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def load_yaml(cls: type[T], path: str | Path, overrides: dict | None = None) -> T:
    """Loads a YAML config file; `overrides` (e.g. from CLI flags) are merged on top, key by key."""
    return from_dict(cls, deep_merge(read_yaml(path), overrides or {}), str(path))


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} → {"train.lr": 1e-3}: MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
