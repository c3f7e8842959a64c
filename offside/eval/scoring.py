"""Batched model calls used by evaluation: option log-likelihoods, greedy generation, and the
published multiple-choice protocol (list the options, generate, parse the letter)."""

from __future__ import annotations

import re

import torch

from offside.engine.losses import answer_logprobs
from offside.models.processor import Processor

LETTERS = "ABCD"
_LETTER = re.compile(r"(?:answer is\s*:?\s*\(?([A-D])\b)|^\(?([A-D])\)?(?:[.:)\s]|$)", re.IGNORECASE)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def option_logliks(model, processor: Processor, rows: list[dict], batch_size: int) -> list[list[float]]:
    """Sum of log-probabilities of each option's text as the answer to the question, per row."""
    device = _device(model)
    scores: list[list[float]] = []
    for chunk in _chunks(rows, batch_size):
        questions = [r["question"] for r in chunk for _ in r["options"]]
        images = [r["image"] for r in chunk for _ in r["options"]]
        options = [o for r in chunk for o in r["options"]]
        inputs = processor.encode(questions, images, options).inputs
        logprobs, _ = answer_logprobs(model, {k: v.to(device) for k, v in inputs.items()})
        totals = logprobs.sum(-1).tolist()
        start = 0
        for r in chunk:
            scores.append(totals[start : start + len(r["options"])])
            start += len(r["options"])
    return scores


@torch.no_grad()
def generate(model, processor: Processor, questions: list[str], images: list, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers, batched with left padding."""
    device = _device(model)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        encoded = processor.encode(questions[start : start + batch_size], images[start : start + batch_size], left_pad=True)
        inputs = {k: v.to(device) for k, v in encoded.inputs.items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.end_id,
            pad_token_id=processor.pad_id,
        )
        width = inputs["input_ids"].shape[1]
        answers.extend(processor.decode(row[width:]) for row in output)
    return answers


def letter_prompt(question: str, options: list[str]) -> str:
    listed = "\n".join(f"{LETTERS[i]}: {option}" for i, option in enumerate(options))
    return f"{question}\n{listed}\nAnswer with the letter of the correct option."


def parse_choice(answer: str, options: list[str]) -> int:
    """The published parser: "The answer is X" or a bare letter; an answer that repeats an option's
    text also counts as that option. -1 when nothing matches (scored wrong)."""
    match = _LETTER.search(answer.strip())
    if match:
        return LETTERS.index((match.group(1) or match.group(2)).upper())
    normalised = answer.strip().lower()
    for i, option in enumerate(options):
        if normalised == option.strip().lower():
            return i
    return -1
