"""The paper's five findings, read off a method matrix run over several seeds (`offside matrix --seeds N`,
its results.json rows), each as a mean over seeds with a 95 % interval (Student's t over the seeds).

A finding compares two numbers per seed — two scenarios of a method, a model before and after
relearning, an attacked and a plain query — and the interval is over the per-seed differences, so the
noise shared by both sides (same seed, same data order) cancels. "Across methods" first averages the
difference over the methods within each seed.

1. unimodal (text-only) unlearning fails on the image form: forget accuracy (image form), unimodal − complete;
2. visual rumours are the hardest to unlearn: rumour survival (offside/eval/summary.py), visual − textual,
   twice: on the forget image (which the vanilla model may simply remember) and on new photos of the
   forget player in the rumoured kit (the visual suite: a rumour that must be read from the kit);
3. selective unlearning spares the shared questions of the forget image: shared-question accuracy,
   selective − complete;
4. corrective relearning brings rumours back: forget accuracy (image form), after − before relearning;
5. prompt attacks recover rumours: rumour recovery under each attack − under the plain query (rows
   evaluated with the robustness suite).

Verdicts: yes (the interval is above 0), reversed (below 0), undecided (it holds 0) — and with one
seed there is no interval, so every verdict is "undecided (one seed)". A finding whose cells the matrix
lacks is stated as not measured, with what it needs. `load_matrix` reads a directory written by
`offside matrix` and refuses anything else (e.g. a quickstart's directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from offside.errors import OffsideError
from offside.report.intervals import over_seeds

FORGET_IMAGE = "forget/image/all/mcq_acc"
FORGET_IMAGE_SHARED = "forget/image/shared/mcq_acc"
PLAIN_QUERY = "none"
ONE_SEED = "undecided (one seed)"
SURVIVAL_KEYS = {"forget image": "summary/survival", "new photos": "summary/survival_new_photos"}  # /visual, /textual
# What each finding is computed from, said where a matrix lacks it.
NEEDS = {
    "1 unimodal fails on the image form": "complete and unimodal cells",
    "2 visual rumours survive more than textual": "complete cells",
    "2 visual rumours survive more than textual, on new photos": "complete cells evaluated with the visual suite (synthetic data)",
    "3 selective spares the shared questions": "complete and selective cells",
    "4 relearning brings rumours back": "relearning cells",
    "5 prompt attacks recover rumours": "--attacks: a matrix whose complete cells ran the robustness suite's prompt attacks",
}


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
    if stat["seeds"] < 2:
        return ONE_SEED
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


def _survival_gap(cells: dict, prefix: str, scenario: str = "complete") -> dict[str, list[float]]:
    visual, textual = f"{prefix}/visual", f"{prefix}/textual"
    return {m: [r["metrics"][visual] - r["metrics"][textual] for r in _runs(row)]
            for (m, sc), row in cells.items() if sc == scenario and all(visual in r["metrics"] and textual in r["metrics"] for r in _runs(row))}


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
        "2 visual rumours survive more than textual": compare(_survival_gap(cells, SURVIVAL_KEYS["forget image"])),
        "2 visual rumours survive more than textual, on new photos": compare(_survival_gap(cells, SURVIVAL_KEYS["new photos"])),
        "3 selective spares the shared questions": compare(_scenario_gap(cells, FORGET_IMAGE_SHARED, "selective", "complete")),
        "4 relearning brings rumours back": compare(_relearning_gain(cells)),
        "5 prompt attacks recover rumours": attack_gains(attack_rows or []),
    }


def _fmt(stat: dict) -> str:
    width = "" if stat["half_width"] is None else f" ± {stat['half_width']:.3f}"
    return f"{stat['mean']:+.3f}{width}"


def render(result: dict, seeds: int) -> str:
    """Markdown: one line per finding (across methods, then per method, each with its verdict); finding 5
    a line per attack; a finding the matrix cannot state, a line saying what it needs."""
    lines = ["| finding | across methods | verdict | per method |", "|---|---|---|---|"]
    for name, found in result.items():
        stats = list(found.items()) if name.startswith("5") else [("", found)]
        if not any(stat["across"] for _, stat in stats):
            lines.append(f"| {name} | – | not measured: needs {NEEDS.get(name, 'other cells')} | |")
        for attack, stat in stats:
            if stat["across"]:
                per_method = ", ".join(f"{m} {_fmt(s)}" + ("" if s["verdict"] == ONE_SEED else f" ({s['verdict']})")
                                       for m, s in stat["methods"].items())
                label = f"{name}: {attack}" if attack else name
                lines.append(f"| {label} | {_fmt(stat['across'])} | {stat['across']['verdict']} | {per_method} |")
    if seeds < 2:
        note = ("One seed: differences without an interval, so no verdict can be reached (every one reads "
                f"\"{ONE_SEED}\"); run the matrix with --seeds 3 or more.")
    else:
        note = f"Differences, mean ± 95 % interval over {seeds} seeds; yes: the interval is above 0, reversed: below 0."
    return "\n".join(lines) + f"\n\n{note}\n"


def load_matrix(directory: str | Path) -> list[dict]:
    """The rows of a directory written by `offside matrix` (its results.json, beside the vanilla_check.json
    it writes before any cell); anything else is an error naming what is missing."""
    root = Path(directory)
    results, check = root / "results.json", root / "vanilla_check.json"
    if not root.is_dir():
        raise OffsideError(f"{root}: no such directory (a directory written by `offside matrix`)")
    if not results.is_file():
        raise OffsideError(f"{root}: no results.json (a directory written by `offside matrix`)")
    if not check.is_file():
        raise OffsideError(f"{root}: not a matrix (no vanilla_check.json, which `offside matrix` writes; a quickstart's "
                           "directory is not one: run `offside matrix --model DIR/vanilla` on it)")
    try:
        rows = json.loads(results.read_text())
    except ValueError as err:
        raise OffsideError(f"{results}: not valid JSON: {err}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"method", "scenario"} <= set(r) for r in rows):
        raise OffsideError(f"{results}: not a matrix's rows (a list of objects with method and scenario)")
    return rows


def seeds_of(rows: list[dict]) -> int:
    """The number of seeds of a matrix's cells (1 when it has none)."""
    return max((len(_runs(row)) for row in rows if row.get("method") != "none" and "error" not in row), default=1)
