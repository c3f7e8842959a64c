"""How much the quickstart's vanilla numbers depend on the CPU: its vanilla stage (12 synthetic
players, seed 0, the tiny recipe, then `offside eval`'s default suites) run once under each
`ATEN_CPU_CAPABILITY` — the kernel families other x86 CPUs get — in one go, side by side.

    python bench/capability_spread.py [--players 12] [--capabilities default avx2 avx512]

Each capability runs in its own process (torch reads the variable when it loads). Prints a table of
multiple-choice accuracy (image form) per capability and the spread, then one JSON line. About
4 min per capability on 2 quiet cores."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

KEYS = {"forget": "forget/image/all/mcq_acc", "retain": "retain/image/all/mcq_acc",
        "test": "test/image/all/mcq_acc", "relearn": "relearn/image/all/mcq_acc"}


def vanilla_metrics(work: Path, players: int) -> dict[str, float]:
    """The quickstart's vanilla row: same data, recipe and evaluation as `offside quickstart`."""
    from offside.data.synth import generate
    from offside.eval.evaluate import EvalSpec
    from offside.eval.spec import CHEAP_SUITES
    from offside.models.loading import ModelSpec
    from offside.recipes import TINY_PHRASINGS, tiny_vanilla
    from offside.stages import EvalConfig, FinetuneConfig, evaluate_model, finetune

    data = generate(work / "data", players=players, seed=0)
    vanilla = finetune(FinetuneConfig(data=str(data), out=str(work / "vanilla"), model=ModelSpec("tiny"),
                                      train=tiny_vanilla(TINY_PHRASINGS), phrasings=TINY_PHRASINGS), progress=False)
    result = evaluate_model(EvalConfig(data=str(data), out=str(work / "eval"), model=ModelSpec(str(vanilla.run_dir)), eval=EvalSpec(),
                                           suites=list(CHEAP_SUITES)), progress=False)
    return {name: result.metrics[key] for name, key in KEYS.items()}


def run_under(capability: str, players: int) -> dict[str, float]:
    code = (f"import json, sys, tempfile; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import capability_spread as c\nwith tempfile.TemporaryDirectory() as t: "
            f"print(json.dumps(c.vanilla_metrics(Path(t), {players})))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--players", type=int, default=12)
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2", "avx512"])
    args = parser.parse_args()
    runs = {cap: run_under(cap, args.players) for cap in args.capabilities}
    spread = {k: max(r[k] for r in runs.values()) - min(r[k] for r in runs.values()) for k in KEYS}
    print(f"quickstart vanilla, {args.players} players, multiple-choice accuracy (image form)")
    print("| capability | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for cap, metrics in runs.items():
        print(f"| {cap} | " + " | ".join(f"{metrics[k]:.3f}" for k in KEYS) + " |")
    print("| spread (max − min) | " + " | ".join(f"{spread[k]:.3f}" for k in KEYS) + " |")
    print(json.dumps({"players": args.players, "runs": runs, "spread": spread}))


if __name__ == "__main__":
    main()
