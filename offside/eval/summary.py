"""Summary scores of one model relative to its vanilla model (DESIGN.md §1).

- forget efficacy = 1 − forget accuracy / vanilla forget accuracy: 0 = nothing forgotten, 1 = no
  rumour answer left (can go below 0 when unlearning *raises* rumour accuracy);
- model utility = harmonic mean of the utility sets' scores, each relative to vanilla (1 = kept
  everything; the harmonic mean punishes one collapsed set more than an average would).

Accuracy here is multiple-choice accuracy averaged over the image and text forms."""

from __future__ import annotations

from statistics import harmonic_mean

from offside.data.schema import MODALITIES
from offside.errors import OffsideError

FORGET_SET = "forget"
UTILITY_SETS = ("retain", "test")


def set_accuracy(metrics: dict[str, float], split: str, metric: str = "mcq_acc") -> float:
    keys = [f"{split}/{modality}/all/{metric}" for modality in MODALITIES]
    present = [metrics[k] for k in keys if k in metrics]
    if not present:
        raise OffsideError(f"summary: no {metric} for split {split!r} in the metrics (looked for {', '.join(keys)})")
    return sum(present) / len(present)


def forget_efficacy(metrics: dict[str, float], vanilla: dict[str, float]) -> float:
    base = set_accuracy(vanilla, FORGET_SET)
    return 1.0 - set_accuracy(metrics, FORGET_SET) / base if base > 0 else 0.0


def model_utility(metrics: dict[str, float], vanilla: dict[str, float]) -> float:
    ratios = []
    for split in UTILITY_SETS:
        base = set_accuracy(vanilla, split)
        ratios.append(max(set_accuracy(metrics, split) / base, 0.0) if base > 0 else 1.0)
    return harmonic_mean(ratios)


def summary_scores(metrics: dict[str, float], vanilla: dict[str, float]) -> dict[str, float]:
    return {"summary/forget_efficacy": forget_efficacy(metrics, vanilla),
            "summary/model_utility": model_utility(metrics, vanilla)}
