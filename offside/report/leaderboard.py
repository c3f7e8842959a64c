"""Leaderboard: `results.json` (one row per run) and `leaderboard.md` (every column), rewritten
atomically as rows arrive so a reader never sees a half-written file; `render_compact` is the
terminal's table (about 8 columns, with a legend)."""

from __future__ import annotations

import json
from pathlib import Path

from offside.files import atomic_write
from offside.report import intervals

# (column title, metric key): multiple-choice accuracy and ROUGE-L, image and text forms, and the
# forget accuracy split by rumour kind (visual: readable from the picture; textual: not).
COLUMNS = [
    (f"{split} {short} {label}", f"{split}/{modality}/all/{metric}")
    for metric, label in (("mcq_acc", "acc"), ("rougeL", "rL"))
    for split in ("forget", "retain", "test", "relearn")
    for modality, short in (("image", "img"), ("text", "txt"))
] + [
    (f"forget {short} {rumour} acc", f"forget/{modality}/{rumour}/mcq_acc")
    for rumour in ("visual", "textual")
    for modality, short in (("image", "img"), ("text", "txt"))
] + [("forget img shared acc", "forget/image/shared/mcq_acc"), ("forget img private acc", "forget/image/private/mcq_acc")] + [
    (f"{kind} rumour survival", f"summary/survival/{kind}") for kind in ("visual", "textual")] + [  # offside/eval/summary.py
    # the visual suite (offside/eval/visual.py): photos never seen, in the rumoured kit and in other clubs' kits
    ("kit following acc", "visual/mcq/kit_following"), ("rumour in new photos acc", "visual/mcq/rumour_in_new_photos"),
    ("rumour in other kits acc", "visual/mcq/rumour_in_other_kits")] + [
    (f"{kind} rumour survival, new photos", f"summary/survival_new_photos/{kind}") for kind in ("visual", "textual")]
# Relearning rows also show the unlearned model's forget accuracy, so resurfacing reads off one row.
BEFORE_RELEARNING = [("forget img acc before relearning", "forget/image/all/mcq_acc")]


def render(rows: list[dict]) -> str:
    """One line per row; a value with a 95 % interval reads `mean ± half-width`, and the last column says
    what the interval is over: seeds (their number), or the items of one run."""
    lines = [
        "| name | method | scenario | " + " | ".join(title for title, _ in COLUMNS + BEFORE_RELEARNING) + " | interval over |",
        "|" + "---|" * (4 + len(COLUMNS) + len(BEFORE_RELEARNING)),
    ]
    for row in rows:
        if row.get("error"):
            cells = [f"failed: {row['error']}"] + [""] * (len(COLUMNS) + len(BEFORE_RELEARNING))
        else:
            cells = [cell(row["metrics"].get(key), row.get("intervals", {}).get(key)) for _, key in COLUMNS]
            cells += [cell(row.get("unlearned_metrics", {}).get(key), row.get("unlearned_intervals", {}).get(key))
                      for _, key in BEFORE_RELEARNING]
            cells.append(interval_basis(row))
        lines.append(f"| {row['name']} | {row['method']} | {row['scenario']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The terminal's table: forget / retain / test / relearn accuracy and rumour survival; the legend says
# what they are. Every column is in results.json, leaderboard.md and the HTML report.
COMPACT = [("forget", "forget/image/all/mcq_acc"), ("retain", "retain/image/all/mcq_acc"), ("test", "test/image/all/mcq_acc"),
           ("relearn", "relearn/image/all/mcq_acc"), ("visual surv.", "summary/survival/visual"),
           ("textual surv.", "summary/survival/textual")]
LEGEND = """forget, retain, test, relearn: multiple-choice accuracy on each split, image form. forget: the rumour still
  wins (lower = more forgotten); retain, test: facts kept, on trained and on new photos (higher = less damage);
  relearn: the true transfer beats the rumour. visual / textual surv.: forget accuracy on rumours readable from
  the picture / only from text, as a share of the vanilla model's (1 = every rumour survived).
  a ± b: mean ± half-width of the 95 % interval, over the seeds or the evaluated items (last column)."""


def render_compact(rows: list[dict], where: str = "") -> str:
    """The leaderboard for a terminal: ~8 columns, aligned, with a legend; `where` names the files that
    hold every column."""
    head = ["model", "method", "scenario", *(title for title, _ in COMPACT), "± over"]
    body = []
    for row in rows:
        if row.get("error"):
            body.append([row["name"], row["method"], row["scenario"], f"failed: {row['error']}"[:60]] + [""] * (len(COMPACT)))
            continue
        body.append([row["name"], row["method"], row["scenario"],
                     *(cell(row["metrics"].get(key), row.get("intervals", {}).get(key)) for _, key in COMPACT), interval_basis(row)])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(text.ljust(width) for text, width in zip(line, widths)) + " |" for line in [head, *body]]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    note = f"\n  Every column: {where}." if where else ""
    return "\n".join(lines) + "\n  " + LEGEND + note + "\n"


def cell(value: float | None, half_width: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if half_width is None else f"{value:.3f} ± {half_width:.3f}"


def interval_basis(row: dict) -> str:
    if not row.get("intervals"):
        return "–"
    return f"{row['seeds']} seeds" if row.get("seeds", 1) > 1 else "items (bootstrap)"


def with_runs(row: dict, runs: list[dict]) -> dict:
    """`row` with the metrics of its runs (dicts with `metrics`, `eval_dir`, and for relearning cells
    `unlearned_metrics`): one run's own, with bootstrap intervals over its evaluated items; several
    runs' mean with 95 % intervals over them, the runs kept under `runs`."""
    if len(runs) == 1:
        (run,) = runs
        predictions = Path(run["eval_dir"]) / "predictions.jsonl"
        records = [json.loads(line) for line in predictions.read_text().splitlines() if line]
        return {**row, **run, "intervals": intervals.over_items(records)}
    row = {**row, "runs": runs}
    row["metrics"], row["intervals"] = intervals.over_seeds([r["metrics"] for r in runs])
    if "unlearned_metrics" in runs[0]:
        row["unlearned_metrics"], row["unlearned_intervals"] = intervals.over_seeds([r["unlearned_metrics"] for r in runs])
    return row


def write(rows: list[dict], out_dir: Path) -> str:
    table = render(rows)
    atomic_write(Path(out_dir) / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write(Path(out_dir) / "leaderboard.md", "# OFFSIDE leaderboard\n\n" + table)
    return table
