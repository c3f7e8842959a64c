"""95 % intervals for leaderboard numbers. Over N ≥ 2 seeds: the mean of the runs ± Student's t
half-width (t at N − 1 degrees of freedom × the sample standard deviation / √N). For one run: a
percentile bootstrap over the evaluated items (1,000 resamples, fixed seed), which measures how much
the number depends on which questions were asked, not on training noise."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from offside.eval.metrics import METRICS

# Two-sided 95 % quantiles of Student's t, by degrees of freedom (beyond the table: the normal's).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
BOOTSTRAP_RESAMPLES = 1000


def t95(dof: int) -> float:
    if dof > max(T95):
        return 1.96
    return T95[max(d for d in T95 if d <= dof)]  # between tabulated ones: the larger t, the wider interval


def over_seeds(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(means, half-widths) of the metrics every run has."""
    keys = sorted(set.intersection(*(set(r) for r in runs)))
    means = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    scale = t95(len(runs) - 1) / math.sqrt(len(runs))
    return means, {k: float(np.std([r[k] for r in runs], ddof=1) * scale) for k in keys}


def over_items(predictions: list[dict], seed: int = 0) -> dict[str, float]:
    """Half-widths of the bootstrap intervals of `<split>/<modality>/all/<metric>` from one run's
    prediction records (as `offside eval` writes them)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for record in predictions:
        for name in METRICS[record["form"]]:
            scores[f"{record['split']}/{record['modality']}/all/{name}"].append(float(record[name]))
    rng = np.random.default_rng(seed)
    widths = {}
    for key, values in scores.items():
        items = np.asarray(values)
        means = items[rng.integers(0, len(items), (BOOTSTRAP_RESAMPLES, len(items)))].mean(1)
        low, high = np.percentile(means, [2.5, 97.5])
        widths[key] = float(high - low) / 2
    return widths
