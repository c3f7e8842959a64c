"""Evaluation of one model on benchmark rows: every split × modality × form, metrics split by
question kind (shared / private) and, on rumours, by rumour kind (visual / textual).

Metric keys: `<split>/<modality>/<group>/<metric>` with group in all | shared | private | visual |
textual, e.g. `forget/image/private/mcq_acc`, `retain/text/all/rougeL`."""

from __future__ import annotations

from collections import defaultdict
from tqdm.auto import tqdm

from offside.engine import comm
from offside.eval.metrics import METRICS
from offside.eval.spec import MCQ_MODES, EvalSpec, check  # noqa: F401  (re-exported)
from offside.eval.scoring import generate, letter_prompt, option_logliks, parse_choice
from offside.models.zero3 import gathered_per_module, partitioned


def groups_of(row: dict) -> list[str]:
    groups = ["all", row["kind"]]
    if row.get("rumour_kind") not in (None, "", "none"):
        groups.append(row["rumour_kind"])
    return groups


def predict(model, processor, rows: list[dict], form: str, spec: EvalSpec) -> list:
    """The model's output per row: an answer string (gen) or a chosen option index (mcq)."""
    if form == "gen":
        return generate(model, processor, [r["question"] for r in rows], [r["image"] for r in rows], spec.batch_size, spec.max_new_tokens)
    if spec.mcq_mode == "loglik":
        scores = option_logliks(model, processor, rows, max(1, spec.batch_size // 4))
        return [max(range(len(s)), key=s.__getitem__) for s in scores]
    prompts = [letter_prompt(r["question"], r["options"]) for r in rows]
    answers = generate(model, processor, prompts, [r["image"] for r in rows], spec.batch_size, 8)
    return [parse_choice(a, r["options"]) for a, r in zip(answers, rows)]


def evaluate(model, processor, bench: dict[str, list[dict]], spec: EvalSpec, progress: bool = True,
             across_ranks: bool | None = None):
    """Returns (metrics, predictions): metrics keyed as above; one prediction record per row. With
    `across_ranks`, inside a process group each rank predicts every world-th row and every rank gets
    all outputs: the same metrics for 1/world of the work. Not under ZeRO-3, where every rank must
    join every forward pass (the weights are gathered collectively; a partitioned model outside an
    engine gathers them module by module). By default (None): whenever it can, so every rank of a
    group must call it."""
    check(spec)
    if across_ranks is None:
        across_ranks = can_split_across_ranks(model)
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    jobs = [(s, m, f) for s in spec.splits for m in spec.modalities for f in spec.forms]
    with gathered_per_module(model):
        for split, modality, form in tqdm(jobs, desc="eval", disable=not progress, leave=False):
            rows = [r for r in bench.get(split, []) if r["modality"] == modality and r["form"] == form][: spec.limit]
            scored, predicted = score_rows(model, processor, split, modality, form, rows, spec, across_ranks)
            metrics |= scored
            predictions += predicted
    model.train(was_training)
    return dict(sorted(metrics.items())), predictions


def can_split_across_ranks(model) -> bool:
    """In a process group of several ranks, with the weights whole on each (not ZeRO-3 partitions)."""
    return comm.active() and not partitioned(model)


def predict_across_ranks(model, processor, rows: list[dict], form: str, spec: EvalSpec) -> list:
    """`predict`, each rank of the process group doing every world-th row; all outputs on every rank."""
    if not comm.active():
        return predict(model, processor, rows, form, spec)
    rank, world = comm.rank(), comm.world_size()
    mine = rows[rank::world]
    parts = comm.all_gather_objects(predict(model, processor, mine, form, spec) if mine else [])
    outputs: list = [None] * len(rows)
    for owner, part in enumerate(parts):
        outputs[owner::world] = part
    return outputs


def score_rows(model, processor, split: str, modality: str, form: str, rows: list[dict], spec: EvalSpec,
               across_ranks: bool = False):
    """Metrics and prediction records of rows of one split × modality × form (any split name, e.g.
    the general-ability set's "general")."""
    if not rows:
        return {}, []
    outputs = (predict_across_ranks if across_ranks else predict)(model, processor, rows, form, spec)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    predictions = []
    for row, output in zip(rows, outputs):
        reference = row["answer"] if form == "gen" else row["correct"]
        scores = {name: fn(output, reference) for name, fn in METRICS[form].items()}
        for group in groups_of(row):
            counts[group] += 1
            for name, score in scores.items():
                sums[f"{split}/{modality}/{group}/{name}"] += score
        predictions.append({"id": row["id"], "split": split, "modality": modality, "form": form, "output": output, **scores})
    return {key: total / counts[key.split("/")[2]] for key, total in sums.items()}, predictions
