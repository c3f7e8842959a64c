"""The pinned golden run: 2 synthetic players (seed 7), the tiny model fine-tuned 15 epochs (seed 0),
then every suite (robustness without the relearning curve). `python tests/golden/golden_run.py`
rewrites tests/golden/metrics.json — only when a metric change is intended; say so in the commit."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from offside.data.synth import generate
from offside.engine.trainer import TrainSpec
from offside.eval.evaluate import EvalSpec
from offside.eval.suites import SUITES, RobustnessSpec
from offside.models.loading import ModelSpec
from offside.stages import EvalConfig, FinetuneConfig, evaluate_model, finetune

GOLDEN = Path(__file__).with_name("metrics.json")
TOLERANCE = 1e-3  # absolute, on every metric (CPU, same seed: differences come from float summation order only)


def golden_metrics(work: Path) -> dict[str, float]:
    data = generate(work / "data", players=2, seed=7)
    train = TrainSpec(epochs=15, lr=3e-3, batch_size=16, seed=0, warmup_ratio=0.05)
    finetune(FinetuneConfig(data=str(data), out=str(work / "vanilla"), model=ModelSpec("tiny"), train=train), progress=False)
    config = EvalConfig(data=str(data), out=str(work / "eval"), model=ModelSpec(str(work / "vanilla")),
                        eval=EvalSpec(batch_size=32), suites=list(SUITES),
                        robustness=RobustnessSpec(relearn_steps=[]))
    return evaluate_model(config, progress=False).metrics


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        metrics = golden_metrics(Path(tmp))
    GOLDEN.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    print(f"{len(metrics)} metrics -> {GOLDEN}", file=sys.stderr)
