"""`offside quickstart`: the whole pipeline on embedded defaults, on one CPU machine.

synthetic benchmark → vanilla tiny model (learns facts and rumours) → GA and GD (complete scenario)
→ eval of vanilla, GA, GD → DIR/leaderboard.md + DIR/results.json. Every stage is an MLflow run in
DIR/mlflow.db (unless MLFLOW_TRACKING_URI is set).

The unlearning runs as a small Ray Tune sweep on a local Ray started in this process (a grid over the
two methods, one DeepSpeed worker per trial, so the numbers match a plain `offside unlearn`): the same
code path as a sweep on a cluster. The sweep lives in DIR/unlearn-sweep; each method's trial is
exported to DIR/<method>."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from offside.data.kits import check_kit_drill
from offside.data.phrasings import check_phrasings
from offside.data.synth import generate
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec
from offside.eval.spec import CHEAP_SUITES
from offside.models.loading import ModelSpec
from offside.eval.summary import rumour_survival
from offside.recipes import TINY_KIT_DRILL, TINY_PHRASINGS, TINY_UNLEARN, tiny_vanilla
from offside.configs import ReportConfig
from offside.report import leaderboard
from offside.report.report import make_report
from offside.tracking import tracking_uri
from offside.stages import EvalConfig, FinetuneConfig, evaluate_model, finetune
from tune_jobs.spec import ResourceSpec, SchedulerSpec, SweepConfig, validate
from tune_jobs.sweep import export_model, run_sweep

QUICKSTART_METHODS = ("ga", "gd")


def quickstart(out: str | Path, players: int = 12, seed: int = 0, seeds: int = 1, phrasings: int = TINY_PHRASINGS,
               kit_drill: int = TINY_KIT_DRILL) -> list[dict]:
    """`seed`: the benchmark's; `seeds`: training seeds 0…seeds−1, each a vanilla model and its
    unlearning (DIR/seed<s>/ when seeds > 1), the leaderboard then showing mean ± 95 % interval over
    them; `phrasings`: wordings per training question of the vanilla model (offside/data/phrasings.py);
    `kit_drill`: its kit drill's photos per club (offside/data/kits.py)."""
    out = Path(out).resolve()  # every path the results, configs and manifests record is absolute
    if out.exists() and any(out.iterdir()):
        raise OffsideError(f"{out}: already exists and is not empty; choose a new --out")
    if seeds < 1:
        raise OffsideError(f"seeds must be ≥ 1, got {seeds}")
    check_phrasings(phrasings)
    check_kit_drill(kit_drill)
    started = time.time()
    data = generate(out / "data", players=players, seed=seed)
    _say(f"data: {players} players at {data} ({time.time() - started:.0f}s)")
    runs: dict[str, list[dict]] = {}
    for train_seed in range(seeds):
        home = out / f"seed{train_seed}" if seeds > 1 else out
        for run in _pipeline(home, data, train_seed, phrasings, kit_drill, started):
            runs.setdefault(run["name"], []).append(run)
    rows = [leaderboard.with_runs({"name": name, "method": rs[0]["method"], "scenario": rs[0]["scenario"], "seeds": seeds},
                                  [{k: v for k, v in r.items() if k not in ("name", "method", "scenario")} for r in rs])
            for name, rs in runs.items()]
    leaderboard.write(rows, out)
    print(leaderboard.render_compact(rows, f"{out / 'results.json'}, {out / 'leaderboard.md'}"))
    report = make_report(ReportConfig(runs=[r["eval_dir"] for rs in runs.values() for r in rs], out=str(out / "report")))
    uri = tracking_uri(out)
    _say(f"quickstart finished in {time.time() - started:.0f}s: {out}")
    print(f"  report: open {(report / 'report.html').resolve().as_uri()} in a browser (plots, every column, the findings)\n"
          f"  MLflow: mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000"
          + ("" if uri.startswith("sqlite:") else " (or your tracking server's address)"), flush=True)
    return rows


def _pipeline(out: Path, data: Path, seed: int, phrasings: int, kit_drill: int, started: float) -> list[dict]:
    """Vanilla model, GA and GD, each evaluated: one run per model (metrics with rumour survival)."""
    vanilla = finetune(FinetuneConfig(data=str(data), out=str(out / "vanilla"), model=ModelSpec("tiny"),
                                      train=tiny_vanilla(phrasings, seed), phrasings=phrasings,
                                      kit_drill=kit_drill))
    _say(f"vanilla (seed {seed}): trained in {time.time() - started:.0f}s")
    models = [("vanilla", "none", "none", vanilla.run_dir)]
    for method, run_dir in _unlearn_sweep(out, data, vanilla.run_dir, seed).items():
        models.append((method, method, "complete", run_dir))
    _say(f"{', '.join(QUICKSTART_METHODS)}: unlearned (Ray Tune sweep) in {time.time() - started:.0f}s")
    runs: list[dict] = []
    for name, method, scenario, run_dir in models:
        result = evaluate_model(EvalConfig(data=str(data), out=str(out / f"eval-{name}"), model=ModelSpec(str(run_dir)), eval=EvalSpec(),
                                           suites=list(CHEAP_SUITES)))
        metrics = {**result.metrics, **rumour_survival(result.metrics, runs[0]["metrics"] if runs else result.metrics)}
        runs.append({"name": name, "method": method, "scenario": scenario, "seed": seed, "run_dir": str(run_dir),
                     "eval_dir": str(result.run_dir), "mlflow_run_id": result.run_id, "metrics": metrics})
        _say(f"eval {name} (seed {seed}): done in {time.time() - started:.0f}s")
    return runs


def _unlearn_sweep(out: Path, data: Path, vanilla: Path, seed: int) -> dict[str, Path]:
    config = SweepConfig(
        name="unlearn-sweep", storage=str(out), data=str(data), vanilla=str(vanilla), methods=list(QUICKSTART_METHODS),
        train=replace(TINY_UNLEARN, seed=seed), search="grid", search_space={"method": {"grid": list(QUICKSTART_METHODS)}},
        scheduler=SchedulerSpec(name="fifo"), resources=ResourceSpec(workers=1, max_concurrent=2, local_cpus=4),
        epoch_eval=EvalSpec(splits=["forget", "retain", "test"], forms=["mcq"], limit=16), export_best=False,
    )
    validate(config, "quickstart sweep")
    result = run_sweep(config, verbose=0)
    if not result.complete:
        raise OffsideError(f"quickstart: the unlearning sweep did not finish ({result.sweep_dir})")
    return {row["settings"]["method"]: export_model(row, config, out / row["settings"]["method"])
            for row in sorted(result.trials, key=lambda r: QUICKSTART_METHODS.index(r["settings"]["method"]))}


def _say(message: str) -> None:
    print(f"[offside] {message}", flush=True)
