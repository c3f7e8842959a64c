"""The vanilla check: has the model that unlearning starts from learned the benchmark?

Unlearning a model that never learned its facts measures nothing, and every number still looks like
a result. The check scores multiple-choice questions (option log-likelihood, image and text forms, a
seeded sample of at most ROWS_PER_SPLIT per split) on forget and retain, and calls the model untrained
when either accuracy falls short of chance + MARGIN × (1 − chance): it must close MARGIN of the gap
from chance to a perfect score (with chance 1 / 4: 0.55).

Chance is what a model that knows nothing scores. Option log-likelihood sums over the option's
tokens, so such a model picks the option with the fewest tokens: chance is that rule's accuracy, and
never less than 1 / options. The tiny model's tokenizer is trained on the benchmark's answers, so a
true answer often tokenizes shorter than the invented distractors (the player's name: almost always):
its chance is 0.36–0.39 on 12 players and 0.66 on 2, and an untrained tiny model scores about that.

MARGIN = 0.4, measured on the quickstart benchmark (12 players; forget/retain): an untrained tiny model
scores 0.48/0.36, one trained with the published defaults (3 epochs at lr 5e-5, train loss 3.7: it has
learned which answers exist, not whose they are) 0.55/0.54, the tiny recipe 0.99/0.97; the thresholds
are 0.64/0.62. On 200 questions the accuracy's standard deviation is at most 0.035."""

from __future__ import annotations

import sys
from statistics import mean

from offside.data.rows import materialise
from offside.data.schema import MODALITIES
from offside.eval.evaluate import EvalSpec, evaluate

SPLITS = ("forget", "retain")
ROWS_PER_SPLIT = 200
MARGIN = 0.4  # of the way from chance to a perfect score


def vanilla_check(model, processor, bench) -> dict:
    """{"forget": {mcq_acc, questions, chance, threshold}, "retain": {...}, "margin", "learned"} for a
    benchmark as `load_benchmark` returns it."""
    rows = {s: materialise(bench[s].shuffle(seed=0)) for s in SPLITS}
    spec = EvalSpec(splits=list(SPLITS), forms=["mcq"], limit=ROWS_PER_SPLIT // len(MODALITIES))
    _, predictions = evaluate(model, processor, rows, spec, progress=False)
    check: dict = {}
    for split in SPLITS:
        by_id = {r["id"]: r for r in rows[split]}
        asked = [p for p in predictions if p["split"] == split]
        if asked:
            chance = _chance(processor, [by_id[p["id"]] for p in asked])
            check[split] = {"mcq_acc": mean(p["mcq_acc"] for p in asked), "questions": len(asked),
                            "chance": chance, "threshold": chance + MARGIN * (1 - chance)}
    learned = all(c["mcq_acc"] >= c["threshold"] for c in check.values())
    return check | {"margin": MARGIN, "learned": learned}


def _chance(processor, questions: list[dict]) -> float:
    """The accuracy of picking the option with the fewest tokens (ties split evenly), at least 1 / options."""
    blind = []
    for q in questions:
        lengths = [len(processor.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in q["options"]]
        shortest = [i for i, n in enumerate(lengths) if n == min(lengths)]
        blind.append(float(q["correct"] in shortest) / len(shortest))
    return max(mean(blind), mean(1 / len(q["options"]) for q in questions))


def untrained(check: dict, model: str) -> str | None:
    """A one-line description of an untrained model, or None when it has learned."""
    if check["learned"]:
        return None
    scores = ", ".join(f"{split} {c['mcq_acc']:.3f} (needs {c['threshold']:.3f}; {c['questions']} questions)"
                       for split, c in check.items() if split in SPLITS)
    return f"the vanilla model {model} has not learned the benchmark, so unlearning it measures nothing: multiple-choice accuracy {scores}"


def checked(model, processor, bench, name: str) -> dict:
    """vanilla_check, with a warning on stderr when the model has not learned."""
    check = vanilla_check(model, processor, bench)
    warn(untrained(check, name))
    return check


def warn(message: str | None) -> None:
    if message:
        print(f"offside: warning: {message}. Train it longer or at a higher learning rate (offside/recipes.py)",
              file=sys.stderr, flush=True)
