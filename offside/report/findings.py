"""The paper's five findings, read off a method matrix run over several seeds (`offside matrix --seeds N`,
its results.json rows), each as a mean over seeds with a 95 % interval (Student's t over the seeds).

A finding compares two numbers per seed — two scenarios of a method, a model before and after
relearning, an attacked and a plain query — and the interval is over the per-seed differences, so the
noise shared by both sides (same seed, same data order) cancels. "Across methods" first averages the
difference over the methods within each seed.

1. unimodal (text-only) unlearning fails on the image form: forget accuracy (image form), unimodal − complete;
2. visual rumours are the hardest to unlearn: rumour survival (offside/eval/summary.py), visual − textual;
3. selective unlearning spares the shared questions of the forget image: shared-question accuracy,
   selective − complete;
4. corrective relearning brings rumours back: forget accuracy (image form), after − before relearning;
5. prompt attacks recover rumours: rumour recovery under each attack − under the plain query (rows
   evaluated with the robustness suite).
"""

from __future__ import annotations

import numpy as np

from offside.report.intervals import over_seeds

FORGET_IMAGE = "forget/image/all/mcq_acc"
FORGET_IMAGE_SHARED = "forget/image/shared/mcq_acc"
PLAIN_QUERY = "none"


def _runs(row: dict) -> list[dict]:
    return row.get("runs") or [row]


def _cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["scenario"]): r for r in rows if "error" not in r and r["method"] != "none"}


def interval(values_per_seed: list[float]) -> dict:
    """mean, half-width, low, high over seeds (one seed: no interval)."""
    if len(values_per_seed) < 2:
        mean = float(values_per_seed[0])
        return {"mean": mean, "half_width": None, "low": mean, "high": mean, "seeds": 1}
    means, widths = over_seeds([{"v": v} for v in values_per_seed])
    mean, width = means["v"], widths["v"]
    return {"mean": mean, "half_width": width, "low": mean - width, "high": mean + width, "seeds": len(values_per_seed)}


def _verdict(stat: dict) -> str:
    if stat["low"] > 0:
        return "yes"
    if stat["high"] < 0:
        return "reversed"
    return "undecided"


def compare(per_method: dict[str, list[float]]) -> dict:
    """Per method and across methods (the per-seed mean over methods): interval and verdict."""
    methods = {m: interval(v) for m, v in sorted(per_method.items())}
    across = interval(list(np.mean(list(per_method.values()), axis=0))) if per_method else None
    for stat in [*methods.values(), *([across] if across else [])]:
        stat["verdict"] = _verdict(stat)
    return {"methods": methods, "across": across}


def _scenario_gap(cells: dict, key: str, scenario: str, baseline: str) -> dict[str, list[float]]:
    out = {}
    for (method, sc), row in cells.items():
        if sc == scenario and (method, baseline) in cells:
            pairs = zip(_runs(row), _runs(cells[method, baseline]))
            out[method] = [a["metrics"][key] - b["metrics"][key] for a, b in pairs]
    return out


def _relearning_gain(cells: dict) -> dict[str, list[float]]:
    return {m: [r["metrics"][FORGET_IMAGE] - r["unlearned_metrics"][FORGET_IMAGE] for r in _runs(row)]
            for (m, sc), row in cells.items() if sc == "relearning"}


def _survival_gap(cells: dict, scenario: str = "complete") -> dict[str, list[float]]:
    return {m: [r["metrics"]["summary/survival/visual"] - r["metrics"]["summary/survival/textual"] for r in _runs(row)]
            for (m, sc), row in cells.items() if sc == scenario and "summary/survival/visual" in _runs(row)[0]["metrics"]}


def attack_gains(rows: list[dict], scenario: str = "complete") -> dict[str, dict]:
    """Per attack: recovery under it − under the plain query, compared across methods."""
    cells = {m: row for (m, sc), row in _cells(rows).items() if sc == scenario}
    plain = f"robust/attack/{PLAIN_QUERY}/recovery"
    attacks = sorted({k.split("/")[2] for row in cells.values() for k in row["metrics"]
                      if k.startswith("robust/attack/") and k.count("/") == 3} - {PLAIN_QUERY})
    return {attack: compare({m: [r["metrics"][f"robust/attack/{attack}/recovery"] - r["metrics"][plain] for r in _runs(row)]
                             for m, row in cells.items()}) for attack in attacks}


def findings(rows: list[dict], attack_rows: list[dict] | None = None) -> dict:
    """The five findings from matrix rows (and, for 5, rows evaluated with the prompt attacks)."""
    cells = _cells(rows)
    return {
        "1 unimodal fails on the image form": compare(_scenario_gap(cells, FORGET_IMAGE, "unimodal", "complete")),
        "2 visual rumours survive more than textual": compare(_survival_gap(cells)),
        "3 selective spares the shared questions": compare(_scenario_gap(cells, FORGET_IMAGE_SHARED, "selective", "complete")),
        "4 relearning brings rumours back": compare(_relearning_gain(cells)),
        "5 prompt attacks recover rumours": attack_gains(attack_rows or []),
    }


def _fmt(stat: dict) -> str:
    width = "" if stat["half_width"] is None else f" ± {stat['half_width']:.3f}"
    return f"{stat['mean']:+.3f}{width}"


def render(result: dict, seeds: int) -> str:
    """Markdown: one line per finding (across methods, then per method); finding 5 a line per attack."""
    lines = ["| finding | across methods | verdict | per method |", "|---|---|---|---|"]
    for name, found in result.items():
        for attack, stat in (found.items() if name.startswith("5") else [("", found)]):
            if stat["across"]:
                per_method = ", ".join(f"{m} {_fmt(s)}" for m, s in stat["methods"].items())
                label = f"{name}: {attack}" if attack else name
                lines.append(f"| {label} | {_fmt(stat['across'])} | {stat['across']['verdict']} | {per_method} |")
    return "\n".join(lines) + (f"\n\nDifferences, mean ± 95 % interval over {seeds} seed(s); yes: the interval is above 0, "
                               "reversed: below 0.\n")
