"""`offside report --runs DIR... --out DIR`: leaderboard.md, a self-contained report.html (plots
embedded as data URIs) and PNG plots, logged to MLflow as one run.

Each DIR is an eval stage directory (metrics.json, manifest.json, config.yaml). Its model directory
(config.yaml → model.name) tells the method, scenario and training seed; the vanilla model is the run
whose model was made by the finetune stage (or `--vanilla DIR`). Summary scores are relative to it.

Plots: forget efficacy vs model utility per method and scenario; relearning recovery curves;
attack × method heatmap of rumour recovery rates.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from offside.errors import OffsideError
from offside.eval.attacks import ATTACKS
from offside.eval.summary import QUANTISED, attack_recoveries, summary_scores
from offside.stages import atomic_dir
from offside.tracking import stage_run, tracking_uri

PLOTS = ("efficacy_vs_utility.png", "relearn_curves.png", "attack_heatmap.png")


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    out: str = ""
    vanilla: str = ""  # eval dir of the vanilla model; default: the run whose model came from finetune


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
    summary: dict[str, float] = field(default_factory=dict)
    worst_attack: str = ""


def load_run(path: Path) -> RunInfo:
    for name in ("metrics.json", "manifest.json", "config.yaml"):
        if not (path / name).is_file():
            raise OffsideError(f"{path}: not an eval run directory (no {name})")
    metrics = json.loads((path / "metrics.json").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    # The manifest's absolute model_path; config.yaml holds the name as given (relative to where it ran).
    model_dir = Path(manifest.get("model_path") or config.get("model", {}).get("name", ""))
    model_config = _read_yaml(model_dir / "config.yaml")
    model_manifest = _read_json(model_dir / "manifest.json")
    stage = model_manifest.get("stage", "")
    return RunInfo(
        name=path.name, path=path, metrics=metrics, manifest=manifest,
        method=model_config.get("method", "none" if stage == "finetune" else "?"),
        scenario=model_config.get("scenario", "none" if stage == "finetune" else "?"),
        seed=model_manifest.get("seed"), train_wall_s=model_manifest.get("wall_time_s"), is_vanilla=stage == "finetune",
    )


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(config: ReportConfig) -> list[RunInfo]:
    if not config.runs:
        raise OffsideError("report: at least one run directory is required (--runs)")
    runs = [load_run(Path(p)) for p in config.runs]
    vanilla = load_run(Path(config.vanilla)) if config.vanilla else next((r for r in runs if r.is_vanilla), None)
    if vanilla is None:
        raise OffsideError("report: no vanilla run among --runs (a run whose model came from `offside finetune`); pass --vanilla DIR")
    for run in runs:
        run.summary = summary_scores(run.metrics, vanilla.metrics)
        if "privacy/mia_auc" in run.metrics:
            run.summary["privacy/mia_auc"] = run.metrics["privacy/mia_auc"]
        rates = attack_recoveries(run.metrics)
        run.worst_attack = max(rates, key=rates.get) if rates else ""
    return runs


COLUMNS = [
    ("forget efficacy", "summary/forget_efficacy"), ("model utility", "summary/model_utility"),
    ("robust forget", "summary/robust_forget"), ("MIA AUC", "privacy/mia_auc"),
]
METRIC_COLUMNS = [
    ("forget img acc", "forget/image/all/mcq_acc"), ("forget txt acc", "forget/text/all/mcq_acc"),
    ("retain img acc", "retain/image/all/mcq_acc"), ("test img acc", "test/image/all/mcq_acc"),
    ("general acc", "general/image/all/mcq_acc"),
]


def table_rows(runs: list[RunInfo]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "method", "scenario", *[t for t, _ in COLUMNS], "worst attack", *[t for t, _ in METRIC_COLUMNS],
            "seed", "data hash", "wall s (train+eval)", "versions", "MLflow run"]
    body = []
    for r in runs:
        versions = r.manifest.get("versions", {})
        wall = (r.train_wall_s or 0.0) + r.manifest.get("wall_time_s", 0.0)
        body.append([
            r.name, r.method, r.scenario, *[_fmt(r.summary.get(k)) for _, k in COLUMNS], r.worst_attack or "–",
            *[_fmt(r.metrics.get(k)) for _, k in METRIC_COLUMNS], str(r.seed), r.manifest.get("data_hash", "")[:12],
            f"{wall:.1f}", f"offside {versions.get('offside', '?')}, torch {versions.get('torch', '?')}",
            f"runs:/{r.manifest.get('mlflow_run_id', '?')}",
        ])
    return head, body


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def leaderboard_md(runs: list[RunInfo]) -> str:
    head, body = table_rows(runs)
    lines = ["# OFFSIDE report — leaderboard", "",
             "Summary scores are relative to the vanilla model; robust forget = forget efficacy under the worst attack.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot_all(runs: list[RunInfo], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {}
    for r in runs:
        marker = markers.setdefault(r.scenario, "osD^v<>p*h"[len(markers) % 10])
        ax.scatter(r.summary["summary/model_utility"], r.summary["summary/forget_efficacy"], marker=marker, s=60,
                   label=f"{r.method} ({r.scenario})")
        ax.annotate(r.name, (r.summary["summary/model_utility"], r.summary["summary/forget_efficacy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("model utility (relative to vanilla)")
    ax.set_ylabel("forget efficacy")
    ax.set_title("Forget efficacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in runs:
        curve = sorted((int(k.split("/")[2][1:]), v) for k, v in r.metrics.items()
                       if k.startswith("robust/relearn/k") and k.endswith("/recovery"))
        if curve:
            ax.plot([k for k, _ in curve], [v for _, v in curve], marker="o", label=r.name)
    ax.set_xlabel("relearning steps k")
    ax.set_ylabel("rumour recovery on held-out forget items")
    ax.set_title("Relearning attack")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no relearning results (robustness suite not run)", ha="center", transform=ax.transAxes)
    paths.append(_save(fig, out / PLOTS[1]))

    attacks = attack_columns(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(attacks) + 2), 0.5 * len(runs) + 2))
    grid = [[attack_recoveries(r.metrics).get(a, float("nan")) for a in attacks] for r in runs]
    image = ax.imshow(grid if attacks else [[0.0]], vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(runs)), [r.name for r in runs], fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="rumour recovery rate")
    ax.set_title("Attack × method: rumour recovery")
    paths.append(_save(fig, out / PLOTS[2]))
    return paths


def attack_columns(runs: list[RunInfo]) -> list[str]:
    """Every attack any run reports, by family: prompt and image attacks in registry order, then the
    quantised models, then relearning by k (unknown names last, alphabetically)."""
    rank = {name: i for i, name in enumerate([*ATTACKS, *QUANTISED])}

    def key(name: str) -> tuple:
        steps = int(name.removeprefix("relearn k")) if name.startswith("relearn k") else -1
        return rank.get(name, len(rank) + (steps >= 0)), steps, name

    return sorted({a for r in runs for a in attack_recoveries(r.metrics)}, key=key)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def report_html(runs: list[RunInfo], plots: list[Path]) -> str:
    head, body = table_rows(runs)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem.replace('_', ' ')}</figcaption></figure>" for p in plots)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}img{max-width:100%}"
             "figure{display:inline-block;margin:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>OFFSIDE report</title><style>{style}</style>"
            f"</head><body><h1>OFFSIDE report</h1><p>Summary scores are relative to the vanilla model; robust forget"
            f" = forget efficacy under the worst attack.</p><table><tr>{cells}</tr>{rows}</table>{images}</body></html>\n")


def make_report(config: ReportConfig) -> Path:
    """Writes the report into config.out (atomically) and logs it to MLflow; returns the directory."""
    if not config.out:
        raise OffsideError("report: an output directory is required (--out)")
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffsideError(f"{out}: already exists; a stage never overwrites another run's directory")
    runs = collect(config)
    with atomic_dir(out) as tmp, stage_run(out.parent, out.name, {"runs": config.runs, "vanilla": config.vanilla},
                                           {"stage": "report"}) as run:
        plots = plot_all(runs, tmp)
        (tmp / "leaderboard.md").write_text(leaderboard_md(runs))
        (tmp / "report.html").write_text(report_html(runs, plots))
        (tmp / "summary.json").write_text(json.dumps(
            {r.name: {**r.summary, "worst_attack": r.worst_attack} for r in runs}, indent=2) + "\n")
        run.log_artifacts(tmp)
    print(f"report: {out} (MLflow {tracking_uri(out.parent)}, run {run.run_id})")
    return out
