"""The chat path of a replica (no Ray, no HTTP): a whole conversation → one prompt in the model's chat
layout; decoding row by row — greedy, or sampled with the row's own seeded generator — with the
model's real log-probabilities recorded as the tokens are chosen; stop strings.

Turns render as Qwen's chat template does, without a default system turn (as the OFFSIDE processor):
`<|im_start|>{role}\\n{vision blocks}{text}<|im_end|>\\n` per message, in order, then
`<|im_start|>assistant\\n`. A user turn's images come first (one vision block each, in order), then
its text parts joined by newlines: a single user turn renders exactly as `Processor.prompt`, i.e. as
`offside eval` asks, and greedy chat answers equal the probe's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.convert_slow_tokenizer import bytes_to_unicode

from offside.eval.scoring import _greedy_config
from offside.models.processor import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START, Processor

_BYTES = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE alphabet → bytes


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str
    images: tuple = ()  # PIL images (user turns), shown before the text


@dataclass(frozen=True)
class Decoding:
    temperature: float = 0.0  # 0: greedy, as `offside eval`
    top_p: float = 1.0
    seed: int = 0  # sampling only
    top_logprobs: int | None = None  # None: no log-probabilities; else alternatives per token (0–20)
    stop: tuple[str, ...] = ()


@dataclass
class ChatJob:
    model: str
    turns: list[Turn]
    max_tokens: int = 32
    decoding: Decoding = field(default_factory=Decoding)


def render(processor: Processor, turns: list[Turn]) -> str:
    vision = VISION_START + IMAGE_PAD * processor.image_tokens + VISION_END
    said = "".join(f"{IM_START}{t.role}\n{vision * len(t.images)}{t.text}{IM_END}\n" for t in turns)
    return f"{said}{IM_START}assistant\n"


def encode(processor: Processor, conversations: list[list[Turn]]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for a batch of conversations (any number of images per row)."""
    rows = [processor.tokenizer(render(processor, turns), add_special_tokens=False)["input_ids"] for turns in conversations]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), processor.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == processor.image_pad_id).int()}
    images = [image for turns in conversations for turn in turns for image in turn.images]
    if images:
        inputs.update(processor._pixels(images))  # the processor's own resize + patching, images in prompt order
    return inputs


class _RowDecoder(LogitsProcessor):
    """Chooses each row's next token from the model's raw scores (it runs before any warper; the
    generation config sets none) and records log-probabilities. It returns scores where only the
    chosen token is finite, so `generate`'s greedy argmax takes it: greedy rows get exactly the
    argmax `generate` would take, sampled rows a draw from their own generator, so a seeded answer
    does not depend on the other rows of its batch."""

    def __init__(self, decodings: list[Decoding]):
        self.decodings = decodings
        self.generators: list[torch.Generator | None] | None = None
        self.record = any(d.top_logprobs is not None for d in decodings)
        self.top_k = max((d.top_logprobs or 0) for d in decodings)
        self.chosen: list[torch.Tensor] = []  # per step: (rows,) log-probability of the chosen token
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: top-k (log-probabilities, ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(d.seed % 2**64) if d.temperature > 0 else None
                               for d in self.decodings]
        tokens = scores.argmax(-1)
        for row, (decoding, generator) in enumerate(zip(self.decodings, self.generators)):
            if generator is not None:
                tokens[row] = _sample(scores[row], decoding, generator)
        if self.record:
            logprobs = torch.log_softmax(scores, -1)
            self.chosen.append(logprobs.gather(1, tokens[:, None])[:, 0])
            if self.top_k:
                self.top.append(logprobs.topk(self.top_k, -1))
        return torch.full_like(scores, -math.inf).scatter_(1, tokens[:, None], 0.0)

    def collect(self) -> tuple[list | None, list | None]:
        """The records on the CPU: chosen[row][step] = log-probability, top[row][step] = [(id, log-probability)]."""
        if not self.chosen:
            return None, None
        chosen = torch.stack(self.chosen, 1).tolist()
        if not self.top:
            return chosen, None
        values, ids = (torch.stack([pair[i] for pair in self.top], 1).tolist() for i in (0, 1))
        return chosen, [[list(zip(i, v)) for i, v in zip(row_ids, row_values)] for row_ids, row_values in zip(ids, values)]


def _sample(scores: torch.Tensor, decoding: Decoding, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax((scores - scores.max()) / decoding.temperature, -1)
    if decoding.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < decoding.top_p  # the smallest set reaching top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.no_grad()
def complete(model, processor: Processor, jobs: list[ChatJob]) -> list[dict]:
    """One `generate` over a batch of chat jobs with the same `max_tokens` → per job its answer."""
    inputs = encode(processor, [j.turns for j in jobs])
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    decoder = _RowDecoder([j.decoding for j in jobs])
    output = model.generate(**inputs, generation_config=_greedy_config(processor, jobs[0].max_tokens),
                            logits_processor=LogitsProcessorList([decoder]))
    width = inputs["input_ids"].shape[1]
    chosen, top = decoder.collect()
    prompt_tokens = inputs["attention_mask"].sum(1).tolist()
    results = []
    for row, job in enumerate(jobs):
        result = _finish(processor, output[row, width:].tolist(), job.decoding.stop) | {"prompt_tokens": prompt_tokens[row]}
        tokens, k = result.pop("token_ids"), job.decoding.top_logprobs
        if k is not None:
            result["logprobs"] = [_entry(processor, t, chosen[row][s], top[row][s][:k] if top else [])
                                  for s, t in enumerate(tokens)]
        results.append(result)
    return results


def _finish(processor: Processor, generated: list[int], stop: tuple[str, ...]) -> dict:
    """The answer's text, its tokens (up to and including the end-of-turn token, or the token that
    completed the first stop string) and why it ended."""
    end = generated.index(processor.end_id) + 1 if processor.end_id in generated else len(generated)
    tokens, reason = generated[:end], "stop" if processor.end_id in generated else "length"
    text = processor.decode(torch.tensor(tokens))
    if stop and any(s in text for s in stop):
        for count in range(1, len(tokens) + 1):  # the stop string completed first, as a streaming server stops
            prefix = processor.decode(torch.tensor(tokens[:count]))
            cut = min((prefix.find(s) for s in stop if s in prefix), default=-1)
            if cut >= 0:
                tokens, text, reason = tokens[:count], prefix[:cut], "stop"
                break
    return {"answer": text, "completion_tokens": len(tokens), "finish_reason": reason, "token_ids": tokens}


def _entry(processor: Processor, token: int, logprob: float, alternatives: list[tuple[int, float]]) -> dict:
    return _token(processor, token, logprob) | {"top_logprobs": [_token(processor, t, lp) for t, lp in alternatives]}


def _token(processor: Processor, token: int, logprob: float) -> dict:
    text = processor.tokenizer.decode([token])
    piece = processor.tokenizer.convert_ids_to_tokens(token)
    raw = bytes(_BYTES[c] for c in piece) if piece and all(c in _BYTES for c in piece) \
        and token not in processor.tokenizer.all_special_ids else text.encode()
    return {"token": text, "logprob": logprob, "bytes": list(raw)}
