"""OpenAI response objects from a replica's answers: the `chat.completion` response, the
`chat.completion.chunk` server-sent events of a streamed one, and the (legacy) `text_completion`.
Answers are dicts as `serve.chat` returns them (answer, finish_reason, prompt_tokens,
completion_tokens, logprobs?); stream events are `{"text", "logprobs"}` deltas, then the answer."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable


def usage(answers: list[dict]) -> dict:
    """The prompt is counted once (as OpenAI does for n > 1), every choice's tokens are."""
    prompt, completion = answers[0]["prompt_tokens"], sum(a["completion_tokens"] for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(entries: list[dict] | None) -> dict | None:
    return {"content": entries, "refusal": None} if entries is not None else None


def completion(model: str, answers: list[dict]) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": a["answer"], "refusal": None},
                "logprobs": _logprobs(a.get("logprobs")), "finish_reason": a["finish_reason"]} for i, a in enumerate(answers)]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(answers)}


def merged(deltas: list[dict]) -> dict:
    """Consecutive text deltas of one row as one."""
    logprobs = [e for d in deltas for e in d["logprobs"]] if deltas[0]["logprobs"] is not None else None
    return {"text": "".join(d["text"] for d in deltas), "logprobs": logprobs}


async def interleaved(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, event) from several event streams as they come. Closing it cancels and awaits
    every reader, so no task is left with an exception nobody retrieves; a stream's error is raised."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, events: AsyncIterator[dict]) -> None:
        try:
            async for event in events:
                queue.put_nowait((index, event))
            queue.put_nowait((index, end))
        except Exception as err:  # noqa: BLE001 — handed to the reader, which raises it
            queue.put_nowait((index, err))

    readers = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(readers)
        while running:
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if event is end:
                running -= 1
            else:
                yield index, event
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream(model: str, choices: int, events: AsyncIterator[tuple[int, dict]], include_usage: bool,
                 failure: Callable[[Exception], tuple[int, str, str]]) -> AsyncIterator[str]:
    """Per choice the role delta (at once), then content deltas as the tokens are generated (with their
    log-probabilities), a delta with its finish_reason; then the usage chunk if asked; then `[DONE]`.
    An error after the stream began is logged (`failure`) and sent as an `error` event (what OpenAI's
    client raises on), without internals."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model} | ({"usage": None} if include_usage else {})

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return _event(head | {"choices": [choice]})

    for i in range(choices):
        yield chunk(i, {"role": "assistant", "content": ""})
    answers: dict[int, dict] = {}
    try:
        async for index, event in events:
            if "finish_reason" in event:
                answers[index] = event
                yield chunk(index, {}, finish_reason=event["finish_reason"])
            else:
                yield chunk(index, {"content": event["text"]}, _logprobs(event["logprobs"]))
    except Exception as err:  # noqa: BLE001 — the status line is sent: report in the stream
        status, message, kind = failure(err)
        yield _event({"error": {"message": message, "type": kind, "code": status}})
        yield _event("[DONE]")
        return
    finally:  # also when the client went away: the replicas' generation stops
        await events.aclose()
    if include_usage:
        yield _event(head | {"choices": [], "usage": usage([answers[i] for i in sorted(answers)])})
    yield _event("[DONE]")


def _legacy_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The completions object's `logprobs` from per-token entries: tokens, their log-probabilities,
    the alternatives as {token: log-probability} with the chosen token among them (up to logprobs + 1),
    and each token's character offset in the returned text."""
    offsets, top = [], []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
        if entry["top_logprobs"] is None:
            top.append(None)
        else:
            alternatives = {t["token"]: t["logprob"] for t in entry["top_logprobs"]}
            alternatives.setdefault(entry["token"], entry["logprob"])
            top.append(alternatives)
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def text_completion(model: str, prompts: list[tuple[tuple[int, ...], str]], n: int, echo: bool,
                    scored: list[dict], generated: list[dict]) -> dict:
    """Choice p·n + i: prompt p's i-th completion (with `echo`, the prompt's text and token
    log-probabilities first). `scored`: per prompt when log-probabilities and echo were asked;
    `generated`: per prompt and choice when max_tokens > 0."""
    choices = []
    for p, (ids, text) in enumerate(prompts):
        for i in range(n):
            answer = generated[p * n + i] if generated else {"answer": "", "finish_reason": "length", "completion_tokens": 0}
            entries = (scored[p]["logprobs"] if scored else []) + answer.get("logprobs", [])
            with_logprobs = bool(scored) or "logprobs" in answer
            choices.append({"index": len(choices), "text": (text if echo else "") + answer["answer"],
                            "logprobs": _legacy_logprobs(entries) if with_logprobs else None,
                            "finish_reason": answer["finish_reason"]})
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    completion_tokens = sum(a["completion_tokens"] for a in generated)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}
