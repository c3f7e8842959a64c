"""Evaluation suites: wall time and samples/s per suite (efficacy, generalization, visual, utility,
robustness) for the tiny model, and the ratio against a one-example-at-a-time loop done the published
way (generate per example; multiple choice by listing the options, generating and parsing the letter),
timed on a sample of each suite's items in the same run.

    python bench/eval_suite.py [--model DIR --data DIR] [--sample N]

Defaults: the quickstart run (runs/quickstart/vanilla on runs/quickstart/data, 12 players) when it
exists, else a fresh 12-player synthetic benchmark and an untrained tiny model. Samples: scored
queries (predictions; for robustness the prompt- and image-attack queries — its wall time also
covers int8, the bitsandbytes NF4/FP4 copies, logit lens, MIA and the relearning curve). The
robustness suite also gets a table per attack: wall time (attacking + scoring; for int8/nf4/fp4
quantising + scoring), items and items/s. Target: all suites < 300 s on 2 cores.
Ends with one JSON line of the figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from eval_throughput import load_model, published_gen, published_mcq  # noqa: E402

from offside.data.general import general_rows  # noqa: E402
from offside.data.loader import load_benchmark  # noqa: E402
from offside.data.photos import PhotoBook  # noqa: E402
from offside.data.rows import materialise  # noqa: E402
from offside.data.synth import generate as synthesise  # noqa: E402
from offside.eval.evaluate import EvalSpec  # noqa: E402
from offside.eval.suites import SUITE_SPLITS, SUITES, RobustnessSpec, UtilitySpec, attack_rows, run_suites  # noqa: E402
from offside.eval.visual import probe_rows  # noqa: E402

QUICKSTART = Path("runs/quickstart")
TARGET_S = 300.0


def suite_items(suite: str, rows: dict[str, list[dict]], utility: UtilitySpec, robustness: RobustnessSpec, data: str) -> list[dict]:
    if suite == "robustness":
        return attack_rows(rows, robustness)
    if suite == "visual":  # the photos it draws of the forget players
        probes, _ = probe_rows(PhotoBook.of(data), [r for r in rows.get("forget", []) if r["modality"] == "image"])
        return [r for probe in probes.values() for r in probe]
    items = [r for split in SUITE_SPLITS[suite] for r in rows.get(split, [])]
    return items + (general_rows(utility.general_scenes, utility.general_seed) if suite == "utility" else [])


def published_rate(model, processor, items: list[dict], sample: int) -> float:
    """Items/s of the published one-at-a-time loop on an even sample of mcq and gen items."""
    mcq = [r for r in items if r["form"] == "mcq"][: sample // 2]
    gen = [r for r in items if r["form"] == "gen"][: sample // 2]
    start = time.perf_counter()
    published_mcq(model, processor, mcq)
    published_gen(model, processor, gen)
    return (len(mcq) + len(gen)) / (time.perf_counter() - start)


def attack_table(timings: dict[str, float], records: list[dict], rows: list[dict]) -> dict[str, dict]:
    """Per attack: wall seconds, items scored (a quantised model scores every attacked row once) and items/s."""
    counts = {name: sum(1 for r in records if r["attack"] == name) or len(rows) for name in timings}
    return {name: {"seconds": round(s, 2), "items": counts[name], "items_per_s": round(counts[name] / s, 1)}
            for name, s in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--sample", type=int, default=32, help="items per suite for the published loop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data and (QUICKSTART / "data").is_dir() and (QUICKSTART / "vanilla").is_dir():
            args.data, args.model = str(QUICKSTART / "data"), args.model or str(QUICKSTART / "vanilla")
        data = args.data or synthesise(os.path.join(tmp, "bench"), players=12, seed=0)
        bench = load_benchmark(data)
        rows = {s: materialise(bench[s]) for s in bench}
        model, processor = load_model(bench, args.model)
        spec, utility, robustness = EvalSpec(), UtilitySpec(), RobustnessSpec()
        table, attacks = {}, {}
        for suite in SUITES:
            start = time.perf_counter()
            result = run_suites(model, processor, rows, [suite], spec, utility, robustness, Path(tmp), progress=False, data_dir=data)
            seconds = time.perf_counter() - start
            attacks |= attack_table(result.timings, result.attack_records, attack_rows(rows, robustness))
            samples = len(result.predictions) + len(result.attack_records)
            baseline = published_rate(model, processor, suite_items(suite, rows, utility, robustness, data), args.sample)
            table[suite] = {"seconds": round(seconds, 2), "samples": samples, "samples_per_s": round(samples / seconds, 2),
                            "published_samples_per_s": round(baseline, 2),
                            "speedup": round(samples / seconds / baseline, 2)}

    print(f"{'suite':<15} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'published/s':>12} {'ratio':>6}")
    for suite, t in table.items():
        print(f"{suite:<15} {t['samples']:>8} {t['seconds']:>8.1f} {t['samples_per_s']:>10.1f} "
              f"{t['published_samples_per_s']:>12.1f} {t['speedup']:>5.1f}x")
    print(f"\n{'attack':<16} {'items':>6} {'seconds':>8} {'items/s':>8}")
    for name, t in attacks.items():
        print(f"{name:<16} {t['items']:>6} {t['seconds']:>8.2f} {t['items_per_s']:>8.1f}")
    total = sum(t["seconds"] for t in table.values())
    print(f"all suites: {total:.1f} s (target < {TARGET_S:.0f} s on 2 cores, {os.cpu_count()} CPUs visible)")
    print(json.dumps({"total_seconds": round(total, 2), "data": data, "model": args.model or "tiny (untrained)",
                      **{f"{s}_{k}": v for s, t in table.items() for k, v in t.items()},
                      **{f"attack_{a}_{k}": v for a, t in attacks.items() for k, v in t.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
