"""`offside report --runs DIR... --out DIR`: leaderboard.md, a self-contained report.html (plots
embedded as data URIs), summary.json and PNG plots, logged to MLflow as one run.

Each DIR is an eval stage directory (metrics.json, manifest.json, config.yaml; predictions.jsonl when
`offside eval` wrote it). Its model directory (manifest model_path, else config.yaml → model.name)
tells the method, scenario and training seed.

Which vanilla: summary scores (forget efficacy, model utility, robust forget, rumour survival) are
relative to a vanilla model (made by the finetune stage). Each run is scored against the vanilla run
among --runs whose model is this run's base model (or its base's base…; compared as resolved paths),
else against `--vanilla DIR`, else the first vanilla run; a vanilla run is its own reference.

Seeds: runs whose models are seed replicates — the same eval settings, and model configs equal but
for `train.seed` and the paths `out` and `model.name`, all the way down the chain of base models (so
models unlearned from vanilla replicates are replicates too) — make one row: every number is
the mean over the N runs ± the half-width of the 95 % Student's t interval ("N seeds"). A run alone in
its row shows a percentile bootstrap over the evaluated items (predictions.jsonl) on its per-item
means, the accuracy columns ("items (bootstrap)"); summary scores, ratios of two runs, show plain.

Plots: forget efficacy vs model utility per method and scenario; relearning recovery curves;
attack × method heatmap of rumour recovery rates ("not run" without the robustness suite); rumour
survival, visual vs textual rumours. report.html also defines its columns and states the paper's
findings that the runs allow (offside/report/findings.py over the rows: scenario pairs of a method,
visual vs textual survival, attacks vs the plain query).
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from offside.configs import ReportConfig, validate_report
from offside.errors import OffsideError
from offside.files import atomic_dir
from offside.eval.attacks import ATTACKS
from offside.eval.summary import QUANTISED, SURVIVAL, SURVIVAL_NEW_PHOTOS, attack_recoveries, summary_scores
from offside.report import intervals, leaderboard
from offside.tracking import stage_run, tracking_uri

PLOTS = ("efficacy_vs_utility.png", "relearn_curves.png", "attack_heatmap.png", "rumour_survival.png")
# Keys of a stage's config.yaml that name where it ran, not what it did (a model's base model is
# compared by its own config instead of its path).
PATH_KEYS = ("out", "model.name")
SEED_KEY = "train.seed"


@dataclass
class RunInfo:
    name: str
    path: Path
    metrics: dict[str, float]
    manifest: dict
    method: str
    scenario: str
    seed: int | None
    train_wall_s: float | None
    is_vanilla: bool
    lineage: list[Path] = field(default_factory=list)  # the model dir, its base model, that one's base…
    key: str = ""  # equal for seed replicates (replicate_key)
    summary: dict[str, float] = field(default_factory=dict)
    vanilla: str = ""  # the eval run its summary scores are relative to

    @property
    def model_dir(self) -> Path:
        return self.lineage[0]


@dataclass
class Row:
    """One report row: a run, or the seed replicates of one model config (their means)."""

    name: str
    runs: list[RunInfo]
    values: dict[str, float]  # metrics and summary scores
    widths: dict[str, float]  # half-widths of the 95 % intervals, where there are any
    worst_attack: str = ""

    method = property(lambda self: self.runs[0].method)
    scenario = property(lambda self: self.runs[0].scenario)
    is_vanilla = property(lambda self: self.runs[0].is_vanilla)

    @property
    def summary(self) -> dict[str, float]:
        return {k: v for k, v in self.values.items() if k.startswith("summary/") or k == "privacy/mia_auc"}

    @property
    def interval_over(self) -> str:
        return leaderboard.interval_basis({"intervals": self.widths, "seeds": len(self.runs)})

    def cell(self, key: str) -> str:
        return leaderboard.cell(self.values.get(key), self.widths.get(key))


def load_run(path: Path) -> RunInfo:
    for name in ("metrics.json", "manifest.json", "config.yaml"):
        if not (path / name).is_file():
            raise OffsideError(f"{path}: not an eval run directory (no {name})")
    lineage = _lineage(path)
    if not lineage:
        raise OffsideError(f"{path}: names no model (manifest.json model_path, config.yaml model.name)")
    model_config = _read_yaml(lineage[0] / "config.yaml")
    model_manifest = _read_json(lineage[0] / "manifest.json")
    stage = model_manifest.get("stage", "")
    return RunInfo(
        name=path.name, path=path, metrics=_read_json(path / "metrics.json"), manifest=_read_json(path / "manifest.json"),
        method=model_config.get("method", "none" if stage == "finetune" else "?"),
        scenario=model_config.get("scenario", "none" if stage == "finetune" else "?"),
        seed=model_manifest.get("seed"), train_wall_s=model_manifest.get("wall_time_s"), is_vanilla=stage == "finetune",
        lineage=lineage, key=replicate_key(path, lineage),
    )


def _base_model(stage_dir: Path) -> Path | None:
    """The model a stage started from: the manifest's absolute model_path, else config.yaml's model.name
    (as given, relative to where it ran)."""
    name = (_read_json(stage_dir / "manifest.json").get("model_path")
            or (_read_yaml(stage_dir / "config.yaml").get("model") or {}).get("name"))
    return Path(name).resolve() if name else None


def _lineage(stage_dir: Path, depth: int = 8) -> list[Path]:
    chain: list[Path] = []
    while len(chain) < depth and (base := _base_model(stage_dir)) is not None:
        chain.append(base)
        stage_dir = base
    return chain


def replicate_key(eval_dir: Path, lineage: list[Path]) -> str:
    """Equal for seed replicates: the eval config and each model config down the lineage, less their
    paths (PATH_KEYS) and the models' training seeds; a model without a config.yaml (a hub model,
    `tiny`) is its path."""
    configs = [_without(_read_yaml(eval_dir / "config.yaml"), *PATH_KEYS)]
    for model_dir in lineage:
        config = _read_yaml(model_dir / "config.yaml")
        configs.append(_without(config, *PATH_KEYS, SEED_KEY) if config else str(model_dir))
    return json.dumps(configs, sort_keys=True, default=str)


def _without(config: dict, *dotted: str) -> dict:
    config = copy.deepcopy(config)
    for key in dotted:
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(config: ReportConfig) -> list[Row]:
    """The report's rows: --runs scored against their vanilla runs, seed replicates grouped."""
    if not config.runs:
        raise OffsideError("report: at least one run directory is required (--runs)")
    runs = [load_run(Path(p)) for p in config.runs]
    fallback = load_run(Path(config.vanilla)) if config.vanilla else next((r for r in runs if r.is_vanilla), None)
    if fallback is None:
        raise OffsideError("report: no vanilla run among --runs (a run whose model came from `offside finetune`); pass --vanilla DIR")
    vanillas: dict[Path, RunInfo] = {}
    for run in [fallback, *(r for r in runs if r.is_vanilla)]:
        vanillas.setdefault(run.model_dir, run)
    for run in runs:
        reference = run if run.is_vanilla else next((vanillas[d] for d in run.lineage if d in vanillas), fallback)
        run.vanilla = reference.name
        run.summary = summary_scores(run.metrics, reference.metrics)
        if "privacy/mia_auc" in run.metrics:
            run.summary["privacy/mia_auc"] = run.metrics["privacy/mia_auc"]
    return group(runs)


def group(runs: list[RunInfo]) -> list[Row]:
    """One row per replicate key, in the order of the runs; names made unique."""
    by_key: dict[str, list[RunInfo]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    rows = [_row(members) for members in by_key.values()]
    seen: Counter[str] = Counter()
    for row in rows:
        seen[row.name] += 1
        row.name += f" ({seen[row.name]})" if seen[row.name] > 1 else ""
    return rows


def _row(runs: list[RunInfo]) -> Row:
    scores = [{**r.metrics, **r.summary} for r in runs]
    if len(runs) > 1:
        values, widths = intervals.over_seeds(scores)
    else:
        values, widths = scores[0], _bootstrap(runs[0].path / "predictions.jsonl")
    rates = attack_recoveries(values)
    return Row(_group_name(runs), runs, values, widths, max(rates, key=rates.get) if rates else "")


def _group_name(runs: list[RunInfo]) -> str:
    stems = {re.sub(r"-seed\d+$", "", r.name) for r in runs}
    return stems.pop() if len(runs) > 1 and len(stems) == 1 else runs[0].name


def _bootstrap(predictions: Path) -> dict[str, float]:
    if not predictions.is_file():
        return {}
    return intervals.over_items([json.loads(line) for line in predictions.read_text().splitlines() if line])


COLUMNS = [
    ("forget efficacy", "summary/forget_efficacy"), ("model utility", "summary/model_utility"),
    ("robust forget", "summary/robust_forget"), ("visual survival", SURVIVAL["visual"][0]),
    ("textual survival", SURVIVAL["textual"][0]), ("visual survival, new photos", SURVIVAL_NEW_PHOTOS["visual"][0]),
    ("textual survival, new photos", SURVIVAL_NEW_PHOTOS["textual"][0]), ("MIA AUC", "privacy/mia_auc"),
]
METRIC_COLUMNS = [
    ("forget img acc", "forget/image/all/mcq_acc"), ("forget txt acc", "forget/text/all/mcq_acc"),
    ("retain img acc", "retain/image/all/mcq_acc"), ("test img acc", "test/image/all/mcq_acc"),
    ("general acc", "general/image/all/mcq_acc"), ("kit following acc", "visual/mcq/kit_following"),
    ("rumour in new photos acc", "visual/mcq/rumour_in_new_photos"),
]
INTERVALS_NOTE = ("a ± b: mean ± half-width of the 95 % interval, over the seeds of the row (Student's t) or, for one run,"
                  " over its evaluated items (percentile bootstrap; accuracy columns only).")
SCORES_NOTE = "Summary scores are relative to the vanilla model; robust forget = forget efficacy under the worst attack."


def table_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "method", "scenario", *[t for t, _ in COLUMNS], "worst attack", *[t for t, _ in METRIC_COLUMNS],
            "interval over", "seed", "data hash", "wall s (train+eval)", "versions", "MLflow run"]
    body = []
    for row in rows:
        runs = row.runs
        versions = [r.manifest.get("versions", {}) for r in runs]
        wall = sum((r.train_wall_s or 0.0) + r.manifest.get("wall_time_s", 0.0) for r in runs) / len(runs)
        body.append([
            row.name, row.method, row.scenario, *[row.cell(k) for _, k in COLUMNS], row.worst_attack or "–",
            *[row.cell(k) for _, k in METRIC_COLUMNS], row.interval_over, ",".join(str(r.seed) for r in runs),
            _distinct(r.manifest.get("data_hash", "")[:12] for r in runs), f"{wall:.1f}",
            _distinct(f"offside {v.get('offside', '?')}, torch {v.get('torch', '?')}" for v in versions),
            " ".join(f"runs:/{r.manifest.get('mlflow_run_id', '?')}" for r in runs),
        ])
    return head, body


def _distinct(values) -> str:
    return "; ".join(dict.fromkeys(values))


def leaderboard_md(rows: list[Row]) -> str:
    head, body = table_rows(rows)
    lines = ["# OFFSIDE report — leaderboard", "", SCORES_NOTE, INTERVALS_NOTE, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def summary_json(rows: list[Row]) -> dict:
    """Per row: the report columns' means, their half-widths, N and the member runs."""
    keys = [k for _, k in COLUMNS + METRIC_COLUMNS]
    return {row.name: {
        **{k: row.values[k] for k in keys if k in row.values}, "worst_attack": row.worst_attack,
        "half_width": {k: row.widths[k] for k in keys if k in row.widths}, "interval_over": row.interval_over,
        "n": len(row.runs), "runs": [r.name for r in row.runs], "seeds": [r.seed for r in row.runs],
        "vanilla": sorted({r.vanilla for r in row.runs}),
    } for row in rows}


def plot_all(rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    figures = [plot_tradeoff(rows), plot_relearning(rows), plot_attacks(rows), plot_survival(rows)]
    return [_save(fig, out / name) for fig, name in zip(figures, PLOTS)]


def plot_tradeoff(rows: list[Row]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers: dict[str, str] = {}
    utility, efficacy = "summary/model_utility", "summary/forget_efficacy"
    for row in rows:
        marker = markers.setdefault(row.scenario, "osD^v<>p*h"[len(markers) % 10])
        x, y = row.values[utility], row.values[efficacy]
        ax.errorbar(x, y, xerr=row.widths.get(utility), yerr=row.widths.get(efficacy), fmt=marker, ms=7, capsize=3,
                    label=f"{row.method} ({row.scenario})")
        ax.annotate(row.name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("model utility (relative to vanilla)")
    ax.set_ylabel("forget efficacy")
    ax.set_title("Forget efficacy vs utility (bars: 95 % over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_relearning(rows: list[Row]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        keys = sorted((int(k.split("/")[2][1:]), k) for k in row.values
                      if k.startswith("robust/relearn/k") and k.endswith("/recovery"))
        if keys:
            errors = [row.widths.get(k) for _, k in keys]
            ax.errorbar([k for k, _ in keys], [row.values[k] for _, k in keys], marker="o", capsize=3, label=row.name,
                        yerr=None if None in errors else errors)
    ax.set_xlabel("relearning steps k")
    ax.set_ylabel("rumour recovery on held-out forget items")
    ax.set_title("Relearning attack")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no relearning results (robustness suite not run)", ha="center", transform=ax.transAxes)
    return fig


def plot_attacks(rows: list[Row]):
    import matplotlib.pyplot as plt

    attacks = attack_columns(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(attacks) + 2), 0.5 * len(rows) + 2))
    ax.set_title("Attack × method: rumour recovery")
    if not attacks:  # an empty grid would draw as one dark cell, i.e. a recovery of 0
        ax.set_axis_off()
        ax.text(0.5, 0.5, "not run: no attack results (evaluate with the robustness suite)", ha="center",
                transform=ax.transAxes)
        return fig
    grid = [[attack_recoveries(row.values).get(a, float("nan")) for a in attacks] for row in rows]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [row.name for row in rows], fontsize=8)
    for i, cells in enumerate(grid):
        for j, v in enumerate(cells):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="rumour recovery rate")
    return fig


def plot_survival(rows: list[Row]):
    """Grouped bars per unlearned row: forget accuracy on visual and on textual rumours relative to
    vanilla, with 95 % error bars where the row has an interval."""
    import matplotlib.pyplot as plt

    shown = [row for row in rows if not row.is_vanilla and any(key in row.values for key, _ in SURVIVAL.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 4.5))
    for offset, (kind, (key, _)) in zip((-0.2, 0.2), SURVIVAL.items() if shown else ()):
        xs = [i + offset for i in range(len(shown))]
        ax.bar(xs, [row.values.get(key, math.nan) for row in shown], width=0.4, label=f"{kind} rumours")
        for x, row in zip(xs, shown):
            if key in row.widths:
                ax.errorbar(x, row.values[key], yerr=row.widths[key], fmt="none", ecolor="black", capsize=3)
    ax.axhline(1.0, color="grey", linestyle="--", label="vanilla (1.0)")
    ax.set_ylim(0, max(1.1, ax.get_ylim()[1]))
    ax.set_xticks(range(len(shown)), [row.name for row in shown], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("unlearned model")
    ax.set_ylabel("forget accuracy / vanilla's (image form)")
    ax.set_title("Rumour survival after unlearning: visual vs textual rumours\n(error bars: 95 % interval)", fontsize=11)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    if not shown:
        ax.text(0.5, 0.5, "no unlearned runs scored on visual / textual rumours", ha="center", transform=ax.transAxes)
    return fig


def attack_columns(rows: list[Row]) -> list[str]:
    """Every attack any row reports, by family: prompt and image attacks in registry order, then the
    quantised models, then relearning by k (unknown names last, alphabetically)."""
    rank = {name: i for i, name in enumerate([*ATTACKS, *QUANTISED])}

    def key(name: str) -> tuple:
        steps = int(name.removeprefix("relearn k")) if name.startswith("relearn k") else -1
        return rank.get(name, len(rank) + (steps >= 0)), steps, name

    return sorted({a for row in rows for a in attack_recoveries(row.values)}, key=key)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# What each column of the report means (shown under the table in report.html).
COLUMN_DEFINITIONS = {
    "forget efficacy": "1 − forget accuracy / the vanilla model's: 0 = nothing forgotten, 1 = no rumour answer left",
    "model utility": "harmonic mean of retain, test and general-ability accuracy, each relative to the vanilla model's "
                     "(1 = everything kept)",
    "robust forget": "forget efficacy under the worst attack: 1 − the highest rumour recovery over every attack / the "
                     "vanilla model's unattacked recovery (robustness suite only)",
    "visual survival": "forget accuracy on rumours that can be read from the picture (the kit, a headline), as a share of "
                       "the vanilla model's (1 = every rumour survived)",
    "textual survival": "the same for rumours only the text association carries",
    "MIA AUC": "membership inference: how well the loss tells forget items (trained on) from test items "
               "(0.5 = indistinguishable)",
    "worst attack": "the attack with the highest rumour recovery rate",
    "forget img acc": "multiple-choice accuracy on the forget set, image form: the rumour still wins (lower = more forgotten)",
    "forget txt acc": "the same on the text-only twins (the player named instead of shown)",
    "retain img acc": "multiple-choice accuracy on the retain set, image form (facts the model must keep)",
    "test img acc": "the same on new photos of the retain contexts (generalisation)",
    "general acc": "the general vision-language set: colours, counts, shapes, positions, text in images",
    "interval over": "what the ± intervals are over: seeds, or the evaluated items of one run (bootstrap)",
}


def findings_rows(rows: list[Row]) -> list[dict]:
    """The report's rows in the shape `offside.report.findings` reads (a matrix's results.json), seeds
    in order. Findings compare rows seed by seed, so only the rows with the most common number of seeds
    take part."""
    def seed(run: RunInfo) -> int:
        return run.seed if run.seed is not None else -1

    unlearned = [row for row in rows if not row.is_vanilla]
    counts = Counter(len(row.runs) for row in unlearned)
    seeds = max(counts, key=lambda n: (counts[n], n)) if counts else 0
    return [{"name": row.name, "method": row.method, "scenario": row.scenario, "metrics": row.values,
             "runs": [{"metrics": {**r.metrics, **r.summary}} for r in sorted(row.runs, key=seed)]}
            for row in unlearned if len(row.runs) == seeds]


def findings_html(rows: list[Row]) -> str:
    """The paper's findings that these runs can state (pairs of scenarios of a method, visual and textual
    survival, attacks against the plain query) over their seeds, as a table; a note when the runs have
    one seed each (a finding is a difference with an interval over seeds)."""
    from offside.report.findings import findings, render

    matrix = findings_rows(rows)
    if not matrix:
        return ""
    if len(matrix[0]["runs"]) < 2:
        return ("<h2>Findings</h2><p>The paper's findings are differences with 95 % intervals over training seeds: "
                "report runs of at least two seeds to see them (offside matrix --seeds 3, offside quickstart --seeds 2).</p>")
    table = render(findings(matrix, matrix), len(matrix[0]["runs"])).strip().splitlines()
    lines = [line for line in table if line.startswith("|") and "not measured" not in line][2:]  # what these runs state
    if not lines:
        return ""
    cells = ["".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) for line in lines]
    note = table[-1] if not table[-1].startswith("|") else ""
    return ("<h2>Findings</h2><table><tr><th>finding</th><th>across methods</th><th>verdict</th><th>per method</th></tr>"
            + "".join(f"<tr>{c}</tr>" for c in cells) + f"</table><p>{html.escape(note)}</p>")


def report_html(rows: list[Row], plots: list[Path]) -> str:
    head, body = table_rows(rows)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem.replace('_', ' ')}</figcaption></figure>" for p in plots)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}img{max-width:100%}"
             "figure{display:inline-block;margin:1em}dt{font-weight:bold;margin-top:.4em}dd{margin-left:1.5em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>OFFSIDE report</title><style>{style}</style>"
            f"</head><body><h1>OFFSIDE report</h1><p>{html.escape(SCORES_NOTE)}</p><p>{html.escape(INTERVALS_NOTE)}</p>"
            f"<table><tr>{cells}</tr>{lines}</table>{_definitions(head)}{findings_html(rows)}{images}</body></html>\n")


def _definitions(head: list[str]) -> str:
    items = "".join(f"<dt>{html.escape(h)}</dt><dd>{html.escape(COLUMN_DEFINITIONS[h])}</dd>" for h in head if h in COLUMN_DEFINITIONS)
    return f"<h2>Columns</h2><dl>{items}</dl>"


def make_report(config: ReportConfig) -> Path:
    """Writes the report into config.out (atomically) and logs it to MLflow; returns the directory."""
    validate_report(config)
    out = Path(config.out)
    rows = collect(config)
    with atomic_dir(out) as tmp, stage_run(out.parent, out.name, {"runs": config.runs, "vanilla": config.vanilla},
                                           {"stage": "report"}) as run:
        plots = plot_all(rows, tmp)
        (tmp / "leaderboard.md").write_text(leaderboard_md(rows))
        (tmp / "report.html").write_text(report_html(rows, plots))
        (tmp / "summary.json").write_text(json.dumps(summary_json(rows), indent=2) + "\n")
        run.log_artifacts(tmp)
    print(f"report: {out} (MLflow {tracking_uri(out.parent)}, run {run.run_id})")
    return out
