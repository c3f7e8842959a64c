"""Distributed trials, measured: per-epoch evaluation split across ranks, and what a trial leaves on disk.

    python bench/distributed_eval.py [--limit N] [--before REV]

1. Evaluation: the golden model scores the same forget/retain/test rows (multiple choice and
   generation) in a gloo process group of 1 worker and of 2, one thread per rank (as one device per
   rank), the fastest of 3 runs. Each rank does every world-th row and all ranks get every output (`evaluate`'s split), so
   the metrics must be identical and the wall time halve. Target: ≥ 1.7× on 2 workers.
2. Trial checkpoints: 2 ranks train LoRA adapters under ZeRO-2 for 5 epochs, each rank writing its own
   checkpoint directory as a sweep trial's workers do, keeping one checkpoint; bytes on disk at the
   end, with this tree's engine and with the engine at REV (default 670e5e8, before each rank pruned
   its own directory and LoRA checkpoints left out the frozen base), run from a git worktree.

Ends with one JSON line of the figures."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
BEFORE = "670e5e8"
EPOCHS = 5
REPEATS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _spawn(worker, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, _free_port(), *args), nprocs=world, join=True)


def _eval_worker(rank: int, world: int, port: int, limit: int, out: str) -> None:
    import torch.distributed as dist

    _join(rank, world, port)
    from offside.data.loader import load_benchmark
    from offside.engine import comm
    from offside.data.rows import materialise
    from offside.eval.evaluate import EvalSpec, evaluate
    from offside.models.loading import ModelSpec, build_or_load

    model, processor = build_or_load(ModelSpec(str(GOLDEN / "model")))
    bench = load_benchmark(GOLDEN / "data")
    rows = {s: materialise(bench[s]) for s in ("forget", "retain", "test")}
    spec = EvalSpec(splits=list(rows), limit=limit, max_new_tokens=32)
    evaluate(model, processor, rows, EvalSpec(splits=["forget"], limit=2, max_new_tokens=4), progress=False)  # warm-up
    walls = []
    for _ in range(REPEATS):  # the fastest of a few: other processes on the machine only ever slow a run
        comm.barrier()
        start = time.perf_counter()
        metrics, predictions = evaluate(model, processor, rows, spec, progress=False)
        walls.append(time.perf_counter() - start)
    wall = min(walls)
    (Path(out) / f"eval-{world}-{rank}.json").write_text(json.dumps({"wall_s": wall, "items": len(predictions), "metrics": metrics}))
    dist.destroy_process_group()


def measure_eval(limit: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            _spawn(_eval_worker, world, limit, out)
        runs = {w: [json.loads((Path(out) / f"eval-{w}-{r}.json").read_text()) for r in range(w)] for w in (1, 2)}
    wall = {w: max(r["wall_s"] for r in ranks) for w, ranks in runs.items()}
    items = runs[1][0]["items"]
    return {"items": items, "wall_s": wall, "items_per_s_per_rank": {w: items / w / wall[w] for w in wall},
            "same_metrics": runs[1][0]["metrics"] == runs[2][0]["metrics"] == runs[2][1]["metrics"],
            "eval_speedup": wall[1] / wall[2]}


def _trial_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    _join(rank, world, port)
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.engine.trainer import TrainSpec, train
    from offside.models.loading import LoraSpec, ModelSpec, build_or_load
    from offside.unlearn import get_method

    bench = load_benchmark(GOLDEN / "data")
    streams = {s: [r for r in materialise(bench[s]) if r["form"] == "gen"][:8] for s in ("forget", "retain")}
    model, processor = build_or_load(ModelSpec(str(GOLDEN / "model"), lora=LoraSpec(r=8)))
    spec = TrainSpec(epochs=EPOCHS, batch_size=2, retain_ratio=1, lr=1e-4, zero_stage=2, keep_checkpoints=1)
    train(model, processor, get_method("gd"), streams, spec, checkpoint_dir=Path(out) / f"rank{rank}", progress=False)
    dist.destroy_process_group()


def trial_bytes() -> None:
    """In a subprocess (whose PYTHONPATH picks the engine): a 2-rank trial's checkpoint bytes, as JSON."""
    with tempfile.TemporaryDirectory() as out:
        _spawn(_trial_worker, 2, out)
        files = [f for f in Path(out).rglob("*") if f.is_file()]
        print(json.dumps({"bytes": sum(f.stat().st_size for f in files),
                          "epochs_kept": sorted({p.name for p in Path(out).glob("rank*/epoch-*")})}))


def measure_trial_bytes(before: str) -> dict:
    def run(pythonpath: Path) -> dict:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        proc = subprocess.run([sys.executable, __file__, "--trial-bytes"], env=env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    figures = {"after": run(ROOT)}
    with tempfile.TemporaryDirectory() as tree:
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", tree, before], capture_output=True, text=True)
        if added.returncode != 0:
            print(f"(no 'before' figure: cannot check out {before}: {added.stderr.strip()})")
            return figures
        try:
            figures["before"] = run(Path(tree))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tree], capture_output=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000, help="rows per split × modality × form (default: all)")
    parser.add_argument("--before", default=BEFORE, help="the commit whose engine gives the 'before' checkpoint figure")
    parser.add_argument("--trial-bytes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial_bytes:
        return trial_bytes()

    ev = measure_eval(args.limit)
    print(f"Per-epoch evaluation, {ev['items']} items (forget/retain/test, mcq + gen), one thread per rank")
    print(f"{'workers':>8} {'wall s':>8} {'items/s per rank':>17}")
    for world in (1, 2):
        print(f"{world:>8} {ev['wall_s'][world]:>8.1f} {ev['items_per_s_per_rank'][world]:>17.2f}")
    print(f"speed-up on 2 workers: {ev['eval_speedup']:.2f}x (target >= 1.7x); same metrics: {ev['same_metrics']}")

    disk = measure_trial_bytes(args.before)
    print(f"\nCheckpoints on disk after {EPOCHS} epochs, 2 ranks, LoRA r=8, ZeRO-2")
    print(f"{'engine':>12} {'MB':>8}  epochs kept")
    for name, fig in disk.items():
        label = "this tree" if name == "after" else args.before
        print(f"{label:>12} {fig['bytes'] / 2**20:>8.2f}  {', '.join(fig['epochs_kept'])}")
    print(json.dumps({"eval_speedup": round(ev["eval_speedup"], 3), "eval_items": ev["items"],
                      "eval_wall_s_1": round(ev["wall_s"][1], 2), "eval_wall_s_2": round(ev["wall_s"][2], 2),
                      "same_metrics": ev["same_metrics"], "trial_bytes_5_epochs": disk["after"]["bytes"],
                      "trial_bytes_5_epochs_before": disk.get("before", {}).get("bytes")}))


if __name__ == "__main__":
    main()
