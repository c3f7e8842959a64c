"""`offside quickstart`: the whole pipeline on embedded defaults, on one CPU machine.

synthetic benchmark → vanilla tiny model (learns facts and rumours) → GA and GD (complete scenario)
→ eval of vanilla, GA, GD → DIR/leaderboard.md + DIR/results.json. Every stage is an MLflow run in
DIR/mlflow.db (unless MLFLOW_TRACKING_URI is set)."""

from __future__ import annotations

import time
from pathlib import Path

from offside.data.synth import generate
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec
from offside.models.loading import ModelSpec
from offside.recipes import TINY_UNLEARN, TINY_VANILLA
from offside.report import leaderboard
from offside.stages import EvalConfig, FinetuneConfig, UnlearnConfig, evaluate_model, finetune, unlearn

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
    for method in ("ga", "gd"):
        result = unlearn(UnlearnConfig(
            data=str(data), out=str(out / method), method=method, scenario="complete", train=TINY_UNLEARN,
            model=ModelSpec(str(vanilla.run_dir), freeze_vision=True),
        ))
        models.append((method, method, "complete", result.run_dir))
        _say(f"{method}: unlearned in {time.time() - started:.0f}s")

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


def _say(message: str) -> None:
    print(f"[offside] {message}", flush=True)
