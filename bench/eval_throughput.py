"""Evaluator throughput: OFFSIDE's batched scoring vs a one-example-at-a-time loop done the published
way (generate per example; multiple choice by listing the options, generating and parsing the
letter), on the same model and rows, measured side by side in one run.

    python bench/eval_throughput.py [--model DIR --data DIR] [--mcq N] [--gen N]

Without --model/--data it generates a small synthetic benchmark and a freshly built tiny model (an
untrained model never stops early, so generation runs the full 32 tokens on both sides).
Targets: ≥ 10× for multiple choice, ≥ 3× for generation. Ends with one JSON line of the figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from offside.data.loader import load_benchmark  # noqa: E402
from offside.data.rows import materialise  # noqa: E402
from offside.data.synth import generate as synthesise  # noqa: E402
from offside.eval.evaluate import EvalSpec, predict  # noqa: E402
from offside.eval.scoring import generate, letter_prompt, parse_choice  # noqa: E402
from offside.models.loading import ModelSpec, build_or_load  # noqa: E402

MAX_NEW_TOKENS = 32


def published_mcq(model, processor, rows):
    """One example at a time: options in the prompt, generate, parse the letter."""
    choices = []
    for r in rows:
        answer = generate(model, processor, [letter_prompt(r["question"], r["options"])], [r["image"]], 1, MAX_NEW_TOKENS)[0]
        choices.append(parse_choice(answer, r["options"]))
    return choices


def published_gen(model, processor, rows):
    return [generate(model, processor, [r["question"]], [r["image"]], 1, MAX_NEW_TOKENS)[0] for r in rows]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_model(bench, name: str | None):
    """The model under test in eval mode: a saved one, or a fresh tiny model with a tokenizer built on
    the benchmark's text."""
    if name:
        model, processor = build_or_load(ModelSpec(name))
    else:
        texts = [t for split in bench.values() for column in ("question", "answer") for t in split[column]]
        model, processor = build_or_load(ModelSpec("tiny"), texts)
    return model.eval(), processor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--mcq", type=int, default=192, help="multiple-choice items")
    parser.add_argument("--gen", type=int, default=96, help="generation items")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synthesise(os.path.join(tmp, "bench"), players=8, seed=0)
        bench = load_benchmark(data)
        rows = materialise(bench["retain"]) + materialise(bench["forget"])
        model, processor = load_model(bench, args.model)
        mcq = [r for r in rows if r["form"] == "mcq"][: args.mcq]
        gen = [r for r in rows if r["form"] == "gen"][: args.gen]
        spec = EvalSpec(max_new_tokens=MAX_NEW_TOKENS)
        predict(model, processor, mcq[:8], "mcq", spec)  # warm-up

        seconds = {
            ("mcq", "offside batched log-likelihood"): timed(lambda: predict(model, processor, mcq, "mcq", spec)),
            ("mcq", "published: generate per example"): timed(lambda: published_mcq(model, processor, mcq)),
            ("gen", "offside batched greedy"): timed(lambda: predict(model, processor, gen, "gen", spec)),
            ("gen", "published: generate per example"): timed(lambda: published_gen(model, processor, gen)),
        }

    sizes = {"mcq": len(mcq), "gen": len(gen)}
    print(f"{'form':<5} {'evaluator':<34} {'items':>6} {'seconds':>8} {'items/s':>8}")
    rates = {}
    for (form, name), secs in seconds.items():
        rates[(form, name)] = sizes[form] / secs
        print(f"{form:<5} {name:<34} {sizes[form]:>6} {secs:>8.2f} {rates[(form, name)]:>8.1f}")
    figures = {}
    for form, target in (("mcq", 10.0), ("gen", 3.0)):
        fast, slow = [rate for (f, _), rate in rates.items() if f == form]
        figures[f"{form}_items_per_s"] = round(fast, 2)
        figures[f"{form}_published_items_per_s"] = round(slow, 2)
        figures[f"{form}_speedup"] = round(fast / slow, 2)
        print(f"{form} speed-up: {fast / slow:.1f}x (target ≥ {target:.0f}x)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
