"""OpenAI chat completion objects from a replica's answers: the `chat.completion` response and the
`chat.completion.chunk` server-sent events of a streamed one. Answers are dicts as `serve.chat.complete`
returns them (answer, finish_reason, prompt_tokens, completion_tokens, logprobs?)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable


def usage(answers: list[dict]) -> dict:
    """The prompt is counted once (as OpenAI does for n > 1), every choice's tokens are."""
    prompt, completion = answers[0]["prompt_tokens"], sum(a["completion_tokens"] for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(answer: dict) -> dict | None:
    return {"content": answer["logprobs"], "refusal": None} if "logprobs" in answer else None


def completion(model: str, answers: list[dict]) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": a["answer"], "refusal": None},
                "logprobs": _logprobs(a), "finish_reason": a["finish_reason"]} for i, a in enumerate(answers)]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(answers)}


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream(model: str, choices: int, answers: Awaitable[list[dict]], include_usage: bool) -> AsyncIterator[str]:
    """Per choice: the role delta (sent at once), then, once generated, the text as one content delta
    and a delta with its finish_reason; then the usage chunk if asked; then `[DONE]`. An error after
    the stream began is an `error` event (what OpenAI's client raises on)."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model} | ({"usage": None} if include_usage else {})

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return _event(head | {"choices": [choice]})

    for i in range(choices):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        done = await answers
    except Exception as err:  # noqa: BLE001 — the status line is sent; report in the stream, without internals
        yield _event({"error": {"message": f"internal error ({type(err).__name__})", "type": "server_error", "code": 500}})
        yield _event("[DONE]")
        return
    for i, answer in enumerate(done):
        yield chunk(i, {"content": answer["answer"]}, _logprobs(answer))
        yield chunk(i, {}, finish_reason=answer["finish_reason"])
    if include_usage:
        yield _event(head | {"choices": [], "usage": usage(done)})
    yield _event("[DONE]")
