"""ASHA vs full grid on the same search space: trial-epochs, wall time and the best objective each finds.

Both sweeps enumerate the same grid (method × learning rate), one trial at a time so the order is
the same; the ASHA one stops trials early on the epoch counter (rungs at grace_period·rf^k epochs).
Every trial is evaluated at every epoch end and keeps its best epoch, so a sweep's best objective is
the best (trial, epoch) it ever evaluated. Target: ASHA's best objective within 2 % of the grid's using
≤ 50 % of its trial-epochs.

    .venv/bin/python bench/tune_asha_vs_grid.py [--players 4] [--epochs 10] [--grace-period 2]
        [--reduction-factor 5] [--methods ga,gd,npo,simnpo] [--lrs 1e-4,3e-4,1e-3,3e-3] [--out DIR]

Needs a benchmark and a vanilla model: made here (synthetic, tiny) unless --data/--vanilla are given.
Prints a table, then one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_inputs(root: Path, players: int) -> tuple[Path, Path]:
    from offside.data.synth import generate
    from offside.engine.trainer import TrainSpec
    from offside.models.loading import ModelSpec
    from offside.stages import FinetuneConfig, finetune

    data = generate(root / "data", players=players, seed=0)
    spec = TrainSpec(epochs=12, lr=3e-3, batch_size=32, warmup_ratio=0.05, weight_decay=0.0)
    vanilla = finetune(FinetuneConfig(data=str(data), out=str(root / "vanilla"), model=ModelSpec("tiny"), train=spec), progress=False)
    return data, vanilla.run_dir


def sweep(root: Path, name: str, scheduler: str, data: Path, vanilla: Path, args) -> dict:
    from tune_jobs.spec import sweep_from_dict
    from tune_jobs.sweep import run_sweep

    config = sweep_from_dict({
        "name": name, "storage": str(root / "tune"), "data": str(data), "vanilla": str(vanilla),
        "methods": args.methods, "search": "grid", "export_best": False,
        "train": {"epochs": args.epochs, "lr": 4e-4, "batch_size": 8, "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0},
        "search_space": {"method": {"grid": args.methods}, "train.lr": {"grid": args.lrs}},
        "scheduler": {"name": scheduler, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor},
        "resources": {"workers": args.workers, "cpus_per_worker": 1, "max_concurrent": 1, "local_cpus": 4},
        "epoch_eval": {"splits": ["forget", "retain", "test"], "forms": ["mcq"], "limit": args.eval_limit},
    }, name)
    started = time.time()
    result = run_sweep(config, verbose=0)
    return {"trials": len(result.trials), "trial_epochs": sum(r["epochs_run"] for r in result.trials),
            "wall_s": round(time.time() - started, 1), "best_objective": round(result.best["objective"], 4),
            "best": {"trial": result.best["trial_id"], **result.best["sample"], "epoch": result.best["epoch"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--players", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--grace-period", type=int, default=2, help="ASHA's first rung (epochs)")
    parser.add_argument("--reduction-factor", type=int, default=5)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["ga", "gd", "npo", "simnpo"])
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--eval-limit", type=int, default=None, help="items per split in each epoch's evaluation (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="DeepSpeed workers per trial")
    parser.add_argument("--data")
    parser.add_argument("--vanilla")
    parser.add_argument("--out", help="work directory (default: a new temp dir)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="tune-bench-"))
    data, vanilla = (Path(args.data), Path(args.vanilla)) if args.data else make_inputs(root, args.players)

    results = {name: sweep(root, name, name, data, vanilla, args) for name in ("fifo", "asha")}
    grid, asha = results["fifo"], results["asha"]
    print(f"{'search':<12}{'trials':>8}{'trial-epochs':>14}{'wall s':>10}{'best objective':>16}  best trial")
    for label, r in (("full grid", grid), ("grid + ASHA", asha)):
        print(f"{label:<12}{r['trials']:>8}{r['trial_epochs']:>14}{r['wall_s']:>10}{r['best_objective']:>16.4f}  {r['best']}")
    gap = (grid["best_objective"] - asha["best_objective"]) / max(abs(grid["best_objective"]), 1e-9)
    share = asha["trial_epochs"] / grid["trial_epochs"]
    print(json.dumps({"grid": grid, "asha": asha, "objective_gap": round(gap, 4), "trial_epoch_share": round(share, 4),
                      "target_met": gap <= 0.02 and share <= 0.5}))


if __name__ == "__main__":
    main()
