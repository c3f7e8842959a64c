"""Per-item metrics. A metric is a function of (model output, reference) → score in [0, 1];
register a new one with `@metric(name, form)` and every suite reports it.

Generation metrics score the greedy answer against the reference sentence; an empty answer scores 0
(it is never dropped). Multiple choice scores the chosen option index against the correct one."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

METRICS: dict[str, dict[str, Callable]] = {"gen": {}, "mcq": {}}


def metric(name: str, form: str):
    def add(fn: Callable) -> Callable:
        METRICS[form][name] = fn
        return fn

    return add


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _rouge_f(kind: str, prediction: str, reference: str) -> float:
    if not prediction.strip():
        return 0.0
    return _rouge().score(reference, prediction)[kind].fmeasure


@metric("rouge1", "gen")
def rouge1(prediction: str, reference: str) -> float:
    return _rouge_f("rouge1", prediction, reference)


@metric("rouge2", "gen")
def rouge2(prediction: str, reference: str) -> float:
    return _rouge_f("rouge2", prediction, reference)


@metric("rougeL", "gen")
def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_f("rougeL", prediction, reference)


@metric("bleu", "gen")
def bleu(prediction: str, reference: str) -> float:
    hypothesis = prediction.lower().split()
    if not hypothesis:
        return 0.0
    return sentence_bleu([reference.lower().split()], hypothesis, smoothing_function=SmoothingFunction().method1)


@metric("mcq_acc", "mcq")
def mcq_accuracy(chosen: int, correct: int) -> float:
    return float(chosen == correct)
