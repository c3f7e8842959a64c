"""ASHA vs full grid on the same search space: trial-epochs, wall time and the best objective each finds.

Both sweeps run the same grid (method × learning rate) one trial at a time, in the same seeded
shuffled order (`tune_jobs/search.py`); the ASHA one stops trials early on the epoch counter (rungs at
grace_period·rf^k epochs; the shipped defaults unless given). Every trial is evaluated at every epoch
end and keeps its best epoch, so a sweep's best objective is the best (trial, epoch) it evaluated.
Target: ASHA's best objective within 2 % of the grid's using ≤ 50 % of its trial-epochs.

One ASHA run is one draw: asynchronous ASHA's decisions depend on the order trials start in. So the
grid's per-epoch objectives are then replayed through the sweep's own ASHA scheduler, first in the
ASHA run's order (it must reproduce that run's trial-epochs; training is deterministic), then over
--orders shuffled orders, giving the spread of trial-epochs and how often the target is met.

    .venv/bin/python bench/tune_asha_vs_grid.py [--players 4] [--epochs 10] [--grace-period N]
        [--reduction-factor N] [--methods ga,gd,npo,simnpo] [--lrs 3e-5,1e-4,3e-4,1e-3,3e-3,1e-2]
        [--seed 0] [--orders 200] [--out DIR]

Needs a benchmark and a vanilla model: made here (synthetic, tiny) unless --data/--vanilla are given.
Prints a table, then one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
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


def bench_config(root: Path, scheduler: str, data: Path, vanilla: Path, args):
    from tune_jobs.spec import sweep_from_dict

    return sweep_from_dict({
        "name": scheduler, "storage": str(root / "tune"), "data": str(data), "vanilla": str(vanilla),
        "methods": args.methods, "search": "grid", "seed": args.seed, "export_best": False,
        "train": {"epochs": args.epochs, "lr": 4e-4, "batch_size": 8, "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0},
        "search_space": {"method": {"grid": args.methods}, "train.lr": {"grid": args.lrs}},
        "scheduler": {"name": scheduler, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor},
        "resources": {"workers": args.workers, "cpus_per_worker": 1, "max_concurrent": 1, "local_cpus": 4},
        "epoch_eval": {"splits": ["forget", "retain", "test"], "forms": ["mcq"], "limit": args.eval_limit},
    }, scheduler)


def sweep(config) -> dict:
    from tune_jobs.sweep import run_sweep

    started = time.time()
    result = run_sweep(config, verbose=0)
    return {"trials": len(result.trials), "trial_epochs": sum(r["epochs_run"] for r in result.trials),
            "wall_s": round(time.time() - started, 1), "best_objective": round(result.best["objective"], 4),
            "best": {"trial": result.best["trial_id"], **result.best["sample"], "epoch": result.best["epoch"]},
            "trajectories": trajectories(result.sweep_dir)}


def trajectories(sweep_dir: Path) -> list[tuple[str, list[float]]]:
    """(point, objective at each epoch) per trial, in the order the trials started."""
    runs = []
    for path in sorted(sweep_dir.glob("run_trial_*/result.json"), key=lambda p: int(p.parent.name.split("_")[3])):  # run_trial_<id>_<index>_…
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines:  # a trial that failed before its first epoch
            continue
        point = json.dumps(lines[0]["config"], sort_keys=True)
        runs.append((point, [line["objective"] for line in sorted(lines, key=lambda r: r["epoch"])]))
    return runs


def replayed(config, runs: list[list[float]]) -> tuple[int, float]:
    """Trial-epochs and best objective of the sweep's ASHA scheduler fed these per-epoch objectives."""
    from tune_jobs.search import replay
    from tune_jobs.sweep import make_scheduler

    epochs = replay(make_scheduler(config), runs)
    return sum(epochs), max(max(values[:n]) for values, n in zip(runs, epochs))


def replay_orders(grid: dict, asha: dict, config, orders: int) -> dict:
    """ASHA's outcome depends on the order trials start in. Replay the grid's per-epoch results through
    the sweep's ASHA: in the real ASHA run's order (it must reproduce that run), then over many seeded orders."""
    by_point = dict(grid["trajectories"])
    reproduced = replayed(config, [by_point[point] for point, _ in asha["trajectories"]])[0] == asha["trial_epochs"]
    shares, gaps = [], []
    for seed in range(orders):
        order = list(by_point.values())
        random.Random(seed).shuffle(order)
        spent, best = replayed(config, order)
        shares.append(spent / grid["trial_epochs"])
        gaps.append((grid["best_objective"] - best) / max(abs(grid["best_objective"]), 1e-9))
    met = [g <= 0.02 and s <= 0.5 for g, s in zip(gaps, shares)]
    return {"orders": orders, "reproduces_run": reproduced, "median_share": round(statistics.median(shares), 4),
            "share_range": [round(min(shares), 4), round(max(shares), 4)], "median_gap": round(statistics.median(gaps), 4),
            "p_within_2pct": round(sum(g <= 0.02 for g in gaps) / orders, 4), "p_target": round(sum(met) / orders, 4)}


def main() -> None:
    from tune_jobs.spec import SchedulerSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--players", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--grace-period", type=int, default=SchedulerSpec.grace_period, help="ASHA's first rung (epochs)")
    parser.add_argument("--reduction-factor", type=int, default=SchedulerSpec.reduction_factor)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["ga", "gd", "npo", "simnpo"])
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0, help="the sweep seed: the shuffled grid's order")
    parser.add_argument("--orders", type=int, default=200, help="shuffled orders ASHA is replayed over")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per split in each epoch's evaluation (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="DeepSpeed workers per trial")
    parser.add_argument("--data")
    parser.add_argument("--vanilla")
    parser.add_argument("--out", help="work directory (default: a new temp dir)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="tune-bench-"))
    data, vanilla = (Path(args.data), Path(args.vanilla)) if args.data else make_inputs(root, args.players)

    configs = {name: bench_config(root, name, data, vanilla, args) for name in ("fifo", "asha")}
    grid, asha = sweep(configs["fifo"]), sweep(configs["asha"])
    replay = replay_orders(grid, asha, configs["asha"], args.orders)
    gap = (grid["best_objective"] - asha["best_objective"]) / max(abs(grid["best_objective"]), 1e-9)
    share = asha["trial_epochs"] / grid["trial_epochs"]
    print(f"{'search':<12}{'trials':>8}{'trial-epochs':>14}{'wall s':>10}{'best objective':>16}  best trial")
    for label, r in (("full grid", grid), ("grid + ASHA", asha)):
        print(f"{label:<12}{r['trials']:>8}{r['trial_epochs']:>14}{r['wall_s']:>10}{r['best_objective']:>16.4f}  {r['best']}")
    print(f"ASHA replayed on the grid's results over {args.orders} shuffled orders (reproduces the run above: "
          f"{replay['reproduces_run']}): trial-epoch share median {replay['median_share']:.2f} "
          f"[{replay['share_range'][0]:.2f}–{replay['share_range'][1]:.2f}], best within 2 % in "
          f"{replay['p_within_2pct']:.0%} of orders, target met in {replay['p_target']:.0%}")
    figures = {k: {f: v for f, v in r.items() if f != "trajectories"} for k, r in (("grid", grid), ("asha", asha))}
    print(json.dumps({**figures, "objective_gap": round(gap, 4), "trial_epoch_share": round(share, 4),
                      "target_met": gap <= 0.02 and share <= 0.5, "replay": replay}))


if __name__ == "__main__":
    main()
