"""Unlearning methods, one file each, registered by name.

To add a method: create `offside/unlearn/<name>.py` with a dataclass subclass of `Method` (its fields
are the method's hyperparameters, their defaults the published ones) decorated with `@register`.
Every module in this package is imported on first use, so the file alone is enough. A method that
compares against a frozen model subclasses `ReferenceMethod`; one that trains on rewritten rows
(e.g. the forget questions with a refusal as the answer) declares them in `rewrites()`."""

from __future__ import annotations

import copy
import importlib
import pkgutil
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from offside.config import from_dict
from offside.engine.losses import answer_logits, sequence_nll
from offside.engine.trainer import Objective
from offside.errors import OffsideError
from offside.models.zero3 import partitioned

METHODS: dict[str, type[Method]] = {}


class Method(Objective):
    name: str = ""


@dataclass
class ReferenceMethod(Method):
    """A method with a frozen reference model: "vanilla" (the model as unlearning starts; with LoRA,
    the same model with its adapters switched off, so no second copy is held) or a model directory
    (e.g. a retain-only fine-tune made by `offside finetune --split retain`)."""

    reference: str = "vanilla"

    def setup(self, model, device) -> None:
        if self.reference != "vanilla":
            from offside.models.loading import DTYPE_NAMES, ModelSpec, build_or_load

            dtype = DTYPE_NAMES[next(model.parameters()).dtype]  # the training dtype, on the training device
            reference, _ = build_or_load(ModelSpec(self.reference, dtype=dtype, device=str(device)))
        elif hasattr(model, "disable_adapter"):
            reference = _AdaptersOff(model)
        elif partitioned(model):
            # A copy of a ZeRO-3 module copies empty partitions; a whole second model per rank is what
            # ZeRO-3 exists to avoid anyway.
            raise OffsideError(f"{self.name}: a 'vanilla' reference under ZeRO-3 needs LoRA (the reference is the "
                               "model with its adapters off); for full fine-tuning set method_args.reference to a model "
                               "directory or use train.zero_stage ≤ 2")
        else:
            reference = copy.deepcopy(model)
        if isinstance(reference, torch.nn.Module):
            reference.to(device).eval().requires_grad_(False)
        self.reference_model = reference

    @torch.no_grad()
    def reference_nll(self, inputs: dict, reduce: str = "mean") -> torch.Tensor:
        return sequence_nll(self.reference_model, inputs, reduce)

    @torch.no_grad()
    def reference_logits(self, inputs: dict) -> torch.Tensor:
        """At the answer positions, as `answer_logits`."""
        return answer_logits(self.reference_model, inputs)[0]


class _AdaptersOff:
    """Calls a PEFT model with its adapters disabled: the base weights are the vanilla model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)


def with_answer(answer: str) -> Callable[[dict], dict]:
    """A row rewrite for `rewrites()`: the same question and image with another answer."""
    return lambda row: {**row, "answer": answer}


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


class _Package(types.ModuleType):
    """This package is also `offside.unlearn`, the API function (offside/api.py): importing a subpackage
    makes it the parent's attribute of that name, so the package itself answers the call."""

    def __call__(self, *args, **kwargs):
        from offside.api import unlearn

        return unlearn(*args, **kwargs)


sys.modules[__name__].__class__ = _Package
