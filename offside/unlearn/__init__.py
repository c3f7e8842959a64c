"""Unlearning methods, one file each, registered by name.

To add a method: create `offside/unlearn/<name>.py` with a dataclass subclass of `Method` (its fields
are the method's hyperparameters, their defaults the published ones) decorated with `@register`.
Every module in this package is imported on first use, so the file alone is enough."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from offside.config import from_dict
from offside.engine.trainer import Objective
from offside.errors import OffsideError

METHODS: dict[str, type[Method]] = {}


class Method(Objective):
    name: str = ""


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def available() -> list[str]:
    _discover()
    return sorted(METHODS)


def get_method(name: str, args: dict[str, Any] | None = None, source: str = "method_args") -> Method:
    _discover()
    if name not in METHODS:
        raise OffsideError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    return from_dict(METHODS[name], args or {}, source)
