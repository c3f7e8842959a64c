"""Batched model calls used by evaluation: option log-likelihoods, greedy generation, and the
published multiple-choice protocol (list the options, generate, parse the letter)."""

from __future__ import annotations

import re

import torch
from transformers import GenerationConfig

from offside.engine import comm
from offside.models.zero3 import partitioned
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
    """Sum of log-probabilities of each option's text (+ end of turn) as the answer to the question.

    The prompt (question + image) is run once per row and its KV cache shared by the row's options,
    which then run as short continuations: the prompt is most of every sequence, so this is ~3× less
    work than scoring four full sequences (tests check both give the same numbers)."""
    device = _device(model)
    scores: list[list[float]] = []
    for chunk in _chunks(rows, batch_size):
        n_options = len(chunk[0]["options"])
        if any(len(r["options"]) != n_options for r in chunk):
            raise ValueError("rows in one batch must have the same number of options")
        prompt = processor.encode([r["question"] for r in chunk], [r["image"] for r in chunk], left_pad=True).inputs
        prompt = {k: v.to(device) for k, v in prompt.items()}
        positions = prompt_positions(model, prompt)
        out = model(**prompt, position_ids=positions, use_cache=True)
        first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(n_options, 0)
        cache = out.cache
        cache.batch_repeat_interleave(n_options)

        options = [processor.tokenizer(o, add_special_tokens=False)["input_ids"] + [processor.end_id]
                   for r in chunk for o in r["options"]]
        width = max(len(o) for o in options)
        ids = torch.full((len(options), width), processor.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, o in enumerate(options):
            ids[i, : len(o)] = torch.tensor(o)
            mask[i, : len(o)] = 1
        start = positions.amax(dim=(0, 2)).repeat_interleave(n_options) + 1
        cont_positions = (start[:, None] + torch.arange(width, device=device)).unsqueeze(0).expand(3, -1, -1)
        full_mask = torch.cat([prompt["attention_mask"].repeat_interleave(n_options, 0), mask], dim=1)
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=cont_positions, cache=cache).logits
        logprobs = torch.cat([first[:, None], torch.log_softmax(logits[:, :-1].float(), -1)], dim=1)
        token_logprobs = torch.gather(logprobs, 2, ids.unsqueeze(-1)).squeeze(-1) * mask
        totals = token_logprobs.sum(-1).view(len(chunk), n_options).tolist()
        scores.extend(totals)
    return scores


def prompt_positions(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen2.5-VL's 3-D (temporal, height, width) positions of a left-padded prompt batch."""
    if "image_grid_thw" in inputs:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        positions, _ = inner.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return positions
    text = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return text.unsqueeze(0).expand(3, -1, -1)


@torch.no_grad()
def generate(model, processor: Processor, questions: list[str], images: list, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers, batched with left padding. With ZeRO-3 partitions every forward pass gathers
    weights with a collective, so a rank whose answers end first keeps stepping (`synced_gpus`) until
    every rank's have ended; otherwise the others would wait on it for ever."""
    device = _device(model)
    synced = comm.active() and partitioned(model)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        encoded = processor.encode(questions[start : start + batch_size], images[start : start + batch_size], left_pad=True)
        inputs = {k: v.to(device) for k, v in encoded.inputs.items()}
        output = model.generate(**inputs, generation_config=_greedy_config(processor, max_new_tokens), synced_gpus=synced)
        width = inputs["input_ids"].shape[1]
        answers.extend(processor.decode(row[width:]) for row in output)
    return answers


def _greedy_config(processor: Processor, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding from our settings only. `generate` fills every unset (None) field of the config it
    is given from the checkpoint's own generation_config (a real one samples, with a repetition
    penalty), so each field with a library default is set to that default here."""
    defaults = GenerationConfig._get_default_generation_params()
    del defaults["max_length"]  # max_new_tokens decides (setting both warns)
    return GenerationConfig(**{**defaults, "do_sample": False, "max_new_tokens": max_new_tokens,
                               "eos_token_id": processor.end_id, "pad_token_id": processor.pad_id})


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
