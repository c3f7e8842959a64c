"""Unlearning scenarios: which rows are forgotten and which are kept (DESIGN.md §1).

`select(ds, scenario)` returns the (forget, retain) training data of a scenario. A scenario is one
entry of `_SELECTORS` (a function of the loaded DatasetDict).
"""

from __future__ import annotations

import random
from typing import Callable

import datasets

from offside.data.schema import SCENARIOS
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


def _text_only(ds: datasets.Dataset, scenario: str, split: str) -> datasets.Dataset:
    text = _where(ds, "modality", "text")
    if len(text) == 0:
        raise OffsideError(f"scenario {scenario!r} trains on text-only twins, but the {split} split has none "
                           "(the published image-only files lack them; `offside data synth` writes them)")
    return text


def _unimodal(ds: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Unlearn from the text-only twins of the forget data; evaluation still covers image and text
    queries. The retain data is `complete`'s (both forms), so the two scenarios differ only in what is
    forgotten: with a text-only retain set, methods with a retain term lost their image-form anchor
    and forgot the image form *more* than `complete` (measured on the tiny model: GD 0.536 vs 0.655)."""
    return _text_only(ds["forget"], "unimodal", "forget"), ds["retain"]


def _relearning(ds: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Corrective relearning unlearns like `complete`; the stage then fine-tunes on the relearn set."""
    if len(ds["relearn"]) == 0:
        raise OffsideError("scenario 'relearning' needs a relearn split (relearn_set.json), and the data has none")
    return _complete(ds)


_SELECTORS: dict[str, Selector] = {
    "complete": _complete, "selective": _selective, "unimodal": _unimodal, "relearning": _relearning,
}
assert tuple(_SELECTORS) == SCENARIOS


def select(ds: datasets.DatasetDict, scenario: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(forget, retain) training data of a scenario."""
    if scenario not in _SELECTORS:
        raise OffsideError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")
    return _SELECTORS[scenario](ds)


def forget_share(forget: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
    """The forget rows of a seeded random `fraction` of the players (at least one player), so the
    scale of the unlearning request can be studied (e.g. 0.1 / 0.5 / 1.0)."""
    if not 0 < fraction <= 1:
        raise OffsideError(f"forget_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return forget
    players = sorted(set(forget["player"]))
    if "" in players:
        raise OffsideError("forget_fraction < 1 needs the player of every forget row, and some are unknown")
    chosen = set(random.Random(seed).sample(players, max(1, round(fraction * len(players)))))
    return forget.select([i for i, p in enumerate(forget["player"]) if p in chosen])
