"""The generation path of a replica (no Ray, no HTTP): a whole conversation → one prompt in the model's
chat layout (or a raw prompt's tokens, for /v1/completions); decoding row by row — greedy, or sampled
with the row's own seeded generator — with the model's real log-probabilities recorded as the tokens
are chosen; stop strings; each row's new text handed to its job's `emit` as it is generated; and the
log-probabilities of a prompt's own tokens (`echo`).

Turns render as Qwen's chat template does, without a default system turn (as the OFFSIDE processor):
`<|im_start|>{role}\\n{vision blocks}{text}<|im_end|>\\n` per message, in order, then
`<|im_start|>assistant\\n`. A user turn's images come first (one vision block each, in order), then
its text parts joined by newlines: a single user turn renders exactly as `Processor.prompt`, i.e. as
`offside eval` asks, and greedy chat answers equal the probe's.

The end-of-turn token ends a row: it is not text, and it is neither a content token in `logprobs` nor
counted in `completion_tokens` (OpenAI's usage counts the message's tokens only). A raw prompt's row
(/v1/completions) lists it in its token log-probabilities, as the legacy completions object lists every
chosen token: harnesses that score with `max_tokens: 1` drop the last entry as the generated one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.convert_slow_tokenizer import bytes_to_unicode

from offside.eval.scoring import _greedy_config, prompt_positions
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
class GenerateJob:
    """A chat conversation (`turns`) or a raw prompt (`prompt_ids`, /v1/completions) to continue.
    `emit` and `cancelled` live in the replica only: `emit(event)` is called from the compute thread
    with each step's new text, and `cancelled` (set when the client went away) ends the row."""

    model: str
    turns: list[Turn] = field(default_factory=list)
    max_tokens: int = 32
    decoding: Decoding = field(default_factory=Decoding)
    prompt_ids: tuple[int, ...] | None = None
    emit: object = field(default=None, repr=False, compare=False)
    cancelled: bool = False

    @property
    def raw(self) -> bool:
        return self.prompt_ids is not None


@dataclass
class ScoreJob:
    """A raw prompt whose own tokens' log-probabilities are asked for (`echo`), with `top`
    alternatives per position."""

    model: str
    prompt_ids: tuple[int, ...]
    top: int = 0


def render(processor: Processor, turns: list[Turn]) -> str:
    vision = VISION_START + IMAGE_PAD * processor.image_tokens + VISION_END
    said = "".join(f"{IM_START}{t.role}\n{vision * len(t.images)}{t.text}{IM_END}\n" for t in turns)
    return f"{said}{IM_START}assistant\n"


def prompt_ids(processor: Processor, job: GenerateJob) -> list[int]:
    if job.raw:
        return list(job.prompt_ids)
    return processor.tokenizer(render(processor, job.turns), add_special_tokens=False)["input_ids"]


def encode(processor: Processor, jobs: list[GenerateJob]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for a batch of jobs (any number of images per row)."""
    inputs = _left_padded(processor, [prompt_ids(processor, j) for j in jobs])
    images = [image for job in jobs for turn in job.turns for image in turn.images]
    if images:
        inputs.update(processor.pixels(images))  # the processor's own resize + patching, images in prompt order
    return inputs


def _left_padded(processor: Processor, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), processor.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == processor.image_pad_id).int()}


class _Row:
    """One row of a batch as it generates: its tokens (without the end-of-turn token), its text so far,
    why it ended, and how much of it the job's `emit` has been given. Text is emitted once it is final:
    not a partial UTF-8 character, not the beginning of a stop string, not (chat) trailing whitespace."""

    def __init__(self, processor: Processor, job: GenerateJob, prompt_tokens: int):
        self.processor, self.job, self.prompt_tokens = processor, job, prompt_tokens
        self.tokens: list[int] = []
        self.entries: list[dict] = []  # log-probability entries, when asked for
        self.text, self.reason, self.steps = "", None, 0
        self.sent_chars = self.sent_entries = 0

    @property
    def done(self) -> bool:
        return self.reason is not None or self.job.cancelled

    def add(self, token: int, logprob: float | None, alternatives: list[tuple[int, float]]) -> None:
        self.steps += 1
        k = self.job.decoding.top_logprobs
        entry = _entry(self.processor, token, logprob, alternatives[:k]) if k is not None else None
        if token == self.processor.end_id:
            self.reason = "stop"
            if entry is not None and self.job.raw:
                self.entries.append(entry)
        else:
            self.tokens.append(token)
            if entry is not None:
                self.entries.append(entry)
            self.text = self._decode()
            cut = min((self.text.find(s) for s in self.job.decoding.stop if s in self.text), default=-1)
            if cut >= 0:  # the first stop string completed: the answer ends before it
                self.text, self.reason = self.text[:cut], "stop"
        if self.reason is None and self.steps >= self.job.max_tokens:
            self.reason = "length"
        self._emit()

    def _decode(self) -> str:
        if self.job.raw:
            return self.processor.tokenizer.decode(self.tokens)
        return self.processor.decode(torch.tensor(self.tokens))  # as `offside eval` decodes (stripped)

    def _emit(self) -> None:
        if self.job.emit is None:
            return
        ready = self.text if self.reason else _settled(self.text, self.job.decoding.stop)
        entries = self.entries[self.sent_entries:] if self.reason or len(ready) > self.sent_chars else []
        if len(ready) > self.sent_chars or entries:
            self.job.emit({"text": ready[self.sent_chars:], "logprobs": entries if self.job.decoding.top_logprobs is not None else None})
            self.sent_chars, self.sent_entries = len(ready), self.sent_entries + len(entries)

    def result(self) -> dict:
        result = {"answer": self.text, "finish_reason": self.reason or "length", "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": len(self.tokens)}
        if self.job.decoding.top_logprobs is not None:
            result["logprobs"] = self.entries
        return result


def _settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a row's text that cannot change any more: without a trailing partial character
    and without a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - held]


class _RowDecoder(LogitsProcessor):
    """Chooses each row's next token from the model's raw scores (it runs before any warper; the
    generation config sets none) and hands it to its row with its log-probabilities. It returns scores
    where only the chosen token is finite, so `generate`'s greedy argmax takes it: greedy rows get
    exactly the argmax `generate` would take, sampled rows a draw from their own generator, so a seeded
    answer does not depend on the other rows of its batch."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows
        self.generators: list[torch.Generator | None] | None = None
        self.record = any(r.job.decoding.top_logprobs is not None for r in rows)
        self.top_k = max((r.job.decoding.top_logprobs or 0) for r in rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(r.job.decoding.seed % 2**64)
                               if r.job.decoding.temperature > 0 else None for r in self.rows]
        tokens = scores.argmax(-1)
        for i, (row, generator) in enumerate(zip(self.rows, self.generators)):
            if generator is not None:
                tokens[i] = _sample(scores[i], row.job.decoding, generator)
        chosen, top = [None] * len(self.rows), [[] for _ in self.rows]
        if self.record:
            logprobs = torch.log_softmax(scores.float(), -1)
            chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            if self.top_k:
                values, ids = logprobs.topk(min(self.top_k, logprobs.shape[-1]), -1)
                top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            if not row.done:
                row.add(token, chosen[i], top[i])
        return torch.full_like(scores, -math.inf).scatter_(1, tokens[:, None], 0.0)


class _Ended(StoppingCriteria):
    """Rows end at their own end: end-of-turn, a stop string, their max_tokens, or a client gone."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


def _sample(scores: torch.Tensor, decoding: Decoding, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax((scores - scores.max()) / decoding.temperature, -1)
    if decoding.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < decoding.top_p  # the smallest set reaching top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.no_grad()
def complete(model, processor: Processor, jobs: list[GenerateJob]) -> list[dict]:
    """One `generate` over a batch of jobs → per job its answer; each row ends on its own."""
    inputs = encode(processor, jobs)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    prompt_tokens = inputs["attention_mask"].sum(1).tolist()
    rows = [_Row(processor, job, n) for job, n in zip(jobs, prompt_tokens)]
    model.generate(**inputs, generation_config=_greedy_config(processor, max(j.max_tokens for j in jobs)),
                   logits_processor=LogitsProcessorList([_RowDecoder(rows)]), stopping_criteria=StoppingCriteriaList([_Ended(rows)]))
    for row in rows:
        if row.reason is None and not row.job.cancelled:  # generate stopped at its own limit
            row.reason = "length"
            row._emit()
    return [row.result() for row in rows]


@torch.no_grad()
def prompt_logprobs(model, processor: Processor, jobs: list[ScoreJob]) -> list[dict]:
    """Per job, the log-probability of each prompt token after the ones before it (None for the first)
    and its `top` alternatives, from one forward pass over the left-padded batch."""
    inputs = _left_padded(processor, [list(j.prompt_ids) for j in jobs])
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    logits = model(**inputs, position_ids=prompt_positions(model, inputs)).logits
    width = inputs["input_ids"].shape[1]
    results = []
    for row, job in enumerate(jobs):
        ids = list(job.prompt_ids)
        start = width - len(ids)
        logprobs = torch.log_softmax(logits[row, start:-1].float(), -1)  # one row at a time: L × vocab at most
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
        top = [[] for _ in chosen]
        if job.top:
            values, top_ids = logprobs.topk(min(job.top, logprobs.shape[-1]), -1)
            top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        entries = [_entry(processor, t, lp, alternatives) for t, lp, alternatives in zip(ids[1:], chosen, top)]
        results.append({"logprobs": [_token(processor, ids[0], None) | {"top_logprobs": None}] + entries})
    return results


def _entry(processor: Processor, token: int, logprob: float | None, alternatives: list[tuple[int, float]]) -> dict:
    return _token(processor, token, logprob) | {"top_logprobs": [_token(processor, t, lp) for t, lp in alternatives]}


def _token(processor: Processor, token: int, logprob: float | None) -> dict:
    text = processor.tokenizer.decode([token])
    piece = processor.tokenizer.convert_ids_to_tokens(token)
    raw = bytes(_BYTES[c] for c in piece) if piece and all(c in _BYTES for c in piece) \
        and token not in processor.tokenizer.all_special_ids else text.encode()
    return {"token": text, "logprob": logprob, "bytes": list(raw)}
