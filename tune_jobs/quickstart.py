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
from pathlib import Path

from offside.data.synth import generate
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec
from offside.models.loading import ModelSpec
from offside.recipes import TINY_UNLEARN, TINY_VANILLA
from offside.report import leaderboard
from offside.stages import EvalConfig, FinetuneConfig, evaluate_model, finetune
from tune_jobs.spec import ResourceSpec, SchedulerSpec, SweepConfig, validate
from tune_jobs.sweep import export_model, run_sweep

QUICKSTART_METHODS = ("ga", "gd")

def quickstart(out: str | Path, players: int = 12, seed: int = 0) -> list[dict]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OffsideError(f"{out}: already exists and is not empty; choose a new --out")
    started = time.time()
    data = generate(out / "data", players=players, seed=seed)
    _say(f"data: {players} players at {data} ({time.time() - started:.0f}s)")

    vanilla = finetune(FinetuneConfig(data=str(data), out=str(out / "vanilla"), model=ModelSpec("tiny"), train=TINY_VANILLA))
    _say(f"vanilla: trained in {time.time() - started:.0f}s")
    models = [("vanilla", "none", "none", vanilla.run_dir)]
    for method, run_dir in _unlearn_sweep(out, data, vanilla.run_dir).items():
        models.append((method, method, "complete", run_dir))
    _say(f"{', '.join(QUICKSTART_METHODS)}: unlearned (Ray Tune sweep) in {time.time() - started:.0f}s")

    rows: list[dict] = []
    for name, method, scenario, run_dir in models:
        result = evaluate_model(EvalConfig(data=str(data), out=str(out / f"eval-{name}"), model=ModelSpec(str(run_dir)), eval=EvalSpec()))
        rows.append({"name": name, "method": method, "scenario": scenario, "run_dir": str(run_dir),
                     "eval_dir": str(result.run_dir), "mlflow_run_id": result.run_id, "metrics": result.metrics})
        table = leaderboard.write(rows, out)
        _say(f"eval {name}: done in {time.time() - started:.0f}s")
    print(table)
    _say(f"quickstart finished in {time.time() - started:.0f}s: {out / 'leaderboard.md'}")
    return rows


def _unlearn_sweep(out: Path, data: Path, vanilla: Path) -> dict[str, Path]:
    config = SweepConfig(
        name="unlearn-sweep", storage=str(out), data=str(data), vanilla=str(vanilla), methods=list(QUICKSTART_METHODS),
        train=TINY_UNLEARN, search="grid", search_space={"method": {"grid": list(QUICKSTART_METHODS)}},
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
