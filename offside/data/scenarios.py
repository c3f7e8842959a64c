"""Unlearning scenarios: which rows are forgotten and which are kept (DESIGN.md §1).

`select(ds, scenario)` returns the (forget, retain) training data of a scenario. A scenario is one
entry of `_SELECTORS` (a function of the loaded DatasetDict), so unimodal and corrective-relearning
scenarios can be added as further entries.
"""

from __future__ import annotations

from typing import Callable

import datasets

from offside.errors import OffsideError

Selector = Callable[[datasets.DatasetDict], tuple[datasets.Dataset, datasets.Dataset]]


def _where(ds: datasets.Dataset, column: str, value: str) -> datasets.Dataset:
    """Rows with ds[column] == value (by index: no images are decoded, no cache is written)."""
    return ds.select([i for i, v in enumerate(ds[column]) if v == value])


def _complete(ds: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset]:
    return ds["forget"], ds["retain"]


def _selective(ds: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset]:
    unknown = sum(k == "unknown" for k in ds["forget"]["kind"])
    if unknown:
        raise OffsideError(f"scenario 'selective': {unknown} forget rows have kind 'unknown' "
                           "(questions not matched to a field), so shared and private cannot be split")
    forget = _where(ds["forget"], "kind", "private")
    retain = datasets.concatenate_datasets([ds["retain"], _where(ds["forget"], "kind", "shared")])
    return forget, retain


_SELECTORS: dict[str, Selector] = {"complete": _complete, "selective": _selective}
SCENARIOS = tuple(_SELECTORS)


def select(ds: datasets.DatasetDict, scenario: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(forget, retain) training data of a scenario."""
    if scenario not in _SELECTORS:
        raise OffsideError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")
    return _SELECTORS[scenario](ds)
