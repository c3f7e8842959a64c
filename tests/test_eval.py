"""Evaluation: metric definitions, the published choice parser, and batched scoring that matches
one-example-at-a-time scoring."""

import pytest
from conftest import untrained_tiny_bench
import torch

from offside.eval.evaluate import EvalSpec, evaluate
from offside.eval.metrics import METRICS, bleu, rouge_l
from offside.eval.scoring import generate as generate_answers
from offside.eval.scoring import option_logliks, parse_choice


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor, rows, _ = untrained_tiny_bench(tmp_path_factory.mktemp("d"), seed=3)
    return model, processor, rows


def test_empty_generation_scores_zero_not_dropped():
    for name, fn in METRICS["gen"].items():
        assert fn("", "He is 27 years old.") == 0.0, name
    assert rouge_l("He is 27 years old.", "He is 27 years old.") == 1.0
    assert 0 < bleu("He is 27 years", "He is 27 years old.") < 1


def test_parse_choice_published_protocol():
    options = ["He is 27.", "He is 28.", "He is 29.", "He is 30."]
    assert parse_choice("The answer is C", options) == 2
    assert parse_choice("B", options) == 1
    assert parse_choice("(d) because", options) == 3
    assert parse_choice("He is 28.", options) == 1
    assert parse_choice("no idea", options) == -1


def test_batched_option_loglik_equals_one_at_a_time(setup):
    model, processor, rows = setup
    mcq = [r for r in rows["forget"] if r["form"] == "mcq"][:12]
    batched = option_logliks(model, processor, mcq, batch_size=8)
    single = [option_logliks(model, processor, [r], batch_size=1)[0] for r in mcq]
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, rel=1e-4, abs=1e-3)


def test_batched_generation_equals_one_at_a_time(setup):
    model, processor, rows = setup
    gen = [r for r in rows["retain"] if r["form"] == "gen"][:10]
    questions, images = [r["question"] for r in gen], [r["image"] for r in gen]
    batched = generate_answers(model, processor, questions, images, batch_size=10, max_new_tokens=6)
    single = [generate_answers(model, processor, [q], [i], batch_size=1, max_new_tokens=6)[0] for q, i in zip(questions, images)]
    assert batched == single


def test_metric_keys_cover_splits_modalities_kinds_and_rumour_kinds(setup):
    model, processor, rows = setup
    metrics, predictions = evaluate(model, processor, rows, EvalSpec(max_new_tokens=4, limit=16), progress=False)
    for key in ("forget/image/private/mcq_acc", "retain/text/all/rougeL", "test/image/shared/bleu",
                "relearn/text/all/mcq_acc", "forget/image/visual/mcq_acc", "forget/text/textual/rouge1"):
        assert key in metrics, key
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(predictions) == sum(min(16, sum(r["modality"] == m and r["form"] == f for r in split))
                                   for split in rows.values() for m in ("image", "text") for f in ("gen", "mcq"))


def test_shared_prompt_scoring_equals_full_sequence_scoring(setup):
    """The KV-cache path gives the same option log-likelihoods as scoring each full sequence."""
    from offside.engine.losses import answer_logprobs

    model, processor, rows = setup
    mcq = [r for split in ("forget", "relearn") for r in rows[split] if r["form"] == "mcq"][::5][:10]
    shared = option_logliks(model, processor, mcq, batch_size=10)
    for row, got in zip(mcq, shared):
        inputs = processor.encode([row["question"]] * 4, [row["image"]] * 4, row["options"]).inputs
        with torch.no_grad():
            logprobs, _ = answer_logprobs(model, inputs)
        assert got == pytest.approx(logprobs.sum(-1).tolist(), rel=1e-4, abs=1e-3)
