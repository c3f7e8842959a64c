"""The golden reference, in two parts that hold on every x86 CPU of this kind.

Training is chaotic: one ulp of difference between CPU kernels (`ATEN_CPU_CAPABILITY` default, avx2,
avx512 sum in different orders) grows over 15 epochs into different models and metrics that differ
by whole questions. Evaluation of a fixed model is not: the same weights on the same data give
identical metrics under every capability (measured). So:

- **Evaluation golden** (`eval.json`): the committed model `model/` (the tiny model fine-tuned 15
  epochs on the committed 2-player benchmark `data/`) through every suite (robustness without the
  relearning curve, which trains). Tolerance EVAL_TOLERANCE: far below one question (1/28 of a split).
- **Training golden** (`training.json`): short runs whose float drift stays small — the tiny model
  fine-tuned from scratch for 3 epochs, and every registered unlearning method for 2 epochs from the
  committed model at one moderate learning rate — recorded as their per-epoch training logs. Its
  tolerances are derived, not guessed: `measure` runs it under each capability at several seeds, and
  each run (the fine-tune, each method) gets SAFETY × the largest spread between capabilities that
  its logs showed at any seed (relative to max(1, |value|)), at least TOLERANCE_FLOOR. Per run, because
  drift differs by three orders of magnitude: from-scratch fine-tuning at lr 3e-3 drifts ~1e-4, an
  unlearning method at 3e-4 ~1e-7, and one shared tolerance would hide a 1 % change to a method.

Both run with TORCH_THREADS intra-op threads, so machines with more cores sum in the same order.
float64 would remove the drift but is not an option: DeepSpeed's gradient reduction rejects it.

Commands (rewrite a golden only when a change of its numbers is intended; say so in the commit):
    python tests/golden/golden_run.py eval       # rewrite eval.json from the committed model
    python tests/golden/golden_run.py measure    # re-measure the spread, rewrite training.json
    python tests/golden/golden_run.py check      # compare both goldens here; exit 1 on drift
    python tests/golden/golden_run.py model      # retrain model/ (then rewrite both goldens)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).parent
DATA, MODEL = HERE / "data", HERE / "model"
EVAL_GOLDEN, TRAINING_GOLDEN = HERE / "eval.json", HERE / "training.json"
EVAL_TOLERANCE = 1e-6  # one question moves a metric by ≥ 1/200 (the largest split × group here)
CAPABILITIES = ("default", "avx2", "avx512")
MEASURE_SEEDS = (0, 1, 2)
SAFETY = 10
TOLERANCE_FLOOR = 1e-6
TORCH_THREADS = 2
UNLEARN_LR = 3e-4  # every method at one rate: the tiny recipe's 1e-3–8e-3 let float drift grow 1000×
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "offside_model.json",
               "tokenizer.json", "tokenizer_config.json", "manifest.json", "history.json")


@contextmanager
def _threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eval_metrics(work: Path, suites: list[str] | None = None) -> dict[str, float]:
    """Every suite's metrics of the committed model on the committed data."""
    from offside.eval.evaluate import EvalSpec
    from offside.eval.suites import SUITES, RobustnessSpec
    from offside.models.loading import ModelSpec
    from offside.stages import EvalConfig, evaluate_model

    config = EvalConfig(data=str(DATA), out=str(work / "eval"), model=ModelSpec(str(MODEL)),
                        eval=EvalSpec(batch_size=32), suites=suites or list(SUITES),
                        robustness=RobustnessSpec(relearn_steps=[]))
    with _threads(TORCH_THREADS):
        return evaluate_model(config, progress=False).metrics


def training_metrics(work: Path, seed: int = 0, methods: list[str] | None = None, finetune_epochs: int = 3,
                     method_args: dict | None = None) -> dict[str, float]:
    """Per-epoch training logs, keyed `<run>/epoch<k>/<log>`: a from-scratch fine-tune (`finetune`)
    and each unlearning method from the committed model. `methods` None = every registered one."""
    from offside.engine.trainer import TrainSpec
    from offside.models.loading import ModelSpec
    from offside.recipes import TINY_METHOD_ARGS, TINY_UNLEARN
    from offside.stages import FinetuneConfig, UnlearnConfig, finetune, unlearn
    from offside.unlearn import available

    logs: dict[str, float] = {}
    with _threads(TORCH_THREADS):
        if finetune_epochs:
            spec = TrainSpec(epochs=finetune_epochs, lr=3e-3, batch_size=16, seed=seed, warmup_ratio=0.05)
            run = finetune(FinetuneConfig(data=str(DATA), out=str(work / "finetune"), model=ModelSpec("tiny"), train=spec), progress=False)
            logs |= _epoch_logs("finetune", run.run_dir)
        for method in available() if methods is None else methods:
            args = TINY_METHOD_ARGS.get(method, {}) | (method_args or {}).get(method, {})
            spec = replace(TINY_UNLEARN, epochs=2, lr=UNLEARN_LR, seed=seed)
            run = unlearn(UnlearnConfig(data=str(DATA), out=str(work / method), model=ModelSpec(str(MODEL), freeze_vision=True),
                                        method=method, method_args=args, train=spec), progress=False)
            logs |= _epoch_logs(method, run.run_dir)
    return logs


def _epoch_logs(name: str, run_dir: Path) -> dict[str, float]:
    history = json.loads((run_dir / "history.json").read_text())
    return {f"{name}/epoch{i}/{key.removeprefix('train/')}": value
            for i, epoch in enumerate(history, 1) for key, value in epoch.items() if key.startswith("train/")}


def drift(expected: dict[str, float], got: dict[str, float], tolerance: float | dict[str, float],
          relative: bool = False) -> dict:
    """The keys that moved beyond their tolerance (one number, or one per run: the key's first part),
    absolute or relative to max(1, |expected|), plus any key that appeared or disappeared."""
    moved = {k: (expected.get(k), got.get(k)) for k in expected.keys() ^ got.keys()}
    for key in expected.keys() & got.keys():
        limit = tolerance[run_of(key)] if isinstance(tolerance, dict) else tolerance
        scale = max(1.0, abs(expected[key])) if relative else 1.0
        if abs(got[key] - expected[key]) > limit * scale:
            moved[key] = (expected[key], got[key])
    return moved


def run_of(key: str) -> str:
    return key.split("/")[0]


def spread(runs: list[dict[str, float]], keys) -> float:
    """The largest difference between runs on any of `keys`, relative to max(1, |value|)."""
    return max((max(r[k] for r in runs) - min(r[k] for r in runs)) / max(1.0, abs(runs[0][k])) for k in keys)


def check(work: Path) -> dict:
    """Both goldens on this machine: the keys that drifted (empty when everything holds)."""
    training = json.loads(TRAINING_GOLDEN.read_text())
    return {
        "eval": drift(json.loads(EVAL_GOLDEN.read_text()), eval_metrics(work / "e"), EVAL_TOLERANCE),
        "training": drift(training["metrics"], training_metrics(work / "t"), training["tolerance"], relative=True),
    }


def _in_subprocess(capability: str, seed: int) -> dict[str, float]:
    """training_metrics under one ATEN_CPU_CAPABILITY (read when torch loads, hence a new process)."""
    code = (f"import json, sys, tempfile; from pathlib import Path; sys.path.insert(0, {str(HERE)!r}); import golden_run\n"
            f"with tempfile.TemporaryDirectory() as tmp: print(json.dumps(golden_run.training_metrics(Path(tmp), seed={seed})))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each run keeps its own store in its temp dir
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure() -> dict:
    """training.json: seed 0's logs; per run, the capability spread at each seed, the spread between
    seeds (what a real difference looks like) and the tolerance."""
    runs = {seed: {cap: _in_subprocess(cap, seed) for cap in CAPABILITIES} for seed in MEASURE_SEEDS}
    metrics = runs[MEASURE_SEEDS[0]]["default"]
    keys = {name: [k for k in metrics if run_of(k) == name] for name in dict.fromkeys(map(run_of, metrics))}
    by_capability = {name: {str(seed): spread(list(by_cap.values()), ks) for seed, by_cap in runs.items()}
                     for name, ks in keys.items()}
    by_seed = {name: spread([by_cap["default"] for by_cap in runs.values()], ks) for name, ks in keys.items()}
    return {
        "metrics": metrics,
        "tolerance": {name: max(TOLERANCE_FLOOR, float(f"{SAFETY * max(s.values()):.1e}")) for name, s in by_capability.items()},
        "measured": {"capabilities": list(CAPABILITIES), "seeds": list(MEASURE_SEEDS), "torch_threads": TORCH_THREADS,
                     "safety": SAFETY, "floor": TOLERANCE_FLOOR, "capability_spread": by_capability, "seed_spread": by_seed},
    }


def train_model(work: Path) -> None:
    """Retrains model/: the tiny model, 15 epochs at lr 3e-3 on the committed data (seed 0)."""
    from offside.engine.trainer import TrainSpec
    from offside.models.loading import ModelSpec
    from offside.stages import FinetuneConfig, finetune

    spec = TrainSpec(epochs=15, lr=3e-3, batch_size=16, seed=0, warmup_ratio=0.05)
    run = finetune(FinetuneConfig(data=str(DATA), out=str(work / "vanilla"), model=ModelSpec("tiny"), train=spec), progress=False)
    shutil.rmtree(MODEL, ignore_errors=True)
    MODEL.mkdir()
    for name in MODEL_FILES:
        shutil.copy2(run.run_dir / name, MODEL / name)


def _write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def main(command: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if command == "model":
            train_model(work)
        elif command == "eval":
            _write(EVAL_GOLDEN, eval_metrics(work))
        elif command == "measure":
            _write(TRAINING_GOLDEN, measure())
        elif command == "check":
            moved = check(work)
            print(json.dumps(moved))
            return int(any(moved.values()))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
