"""OpenAI chat semantics of the probe app's /v1/chat/completions on a real local Ray Serve (loopback):
the whole conversation, streaming, usage, logprobs from the model's real scores, stop, sampling, and
the checks on every parameter. The model is the committed golden one (full-weight)."""

import base64
import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.models.loading import ModelSpec, build_or_load
from transformers.convert_slow_tokenizer import bytes_to_unicode

from offside.eval.scoring import _greedy_config
from serve.chat import GenerateJob, Turn, encode, render
from serve.settings import TOKEN_ENV

TOKEN = "chat-token"
GOLDEN = Path(__file__).resolve().parent / "golden"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
UNICODE = bytes_to_unicode()  # bytes → the byte-level BPE alphabet of the tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serve.local import start, stop

    token = tmp_path_factory.mktemp("chat") / "token"
    token.write_text(TOKEN)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop(TOKEN_ENV, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield start({"models": {"vanilla": str(GOLDEN / "model")}, "token_file": str(token), "max_new_tokens": 12},
                port, num_cpus=2, quiet=True)
    stop()


@pytest.fixture(scope="module")
def local():
    model, processor = build_or_load(ModelSpec(str(GOLDEN / "model")))
    return model.eval(), processor


@pytest.fixture(scope="module")
def rows():
    """Two forget items with images, free-form questions."""
    forget = materialise(load_benchmark(GOLDEN / "data")["forget"])
    return [r for r in forget if r["form"] == "gen" and r["image"] is not None][:2]


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _user(row) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": row["question"]},
                                        {"type": "image_url", "image_url": {"url": _png(row["image"])}}]}


def _chat(url, **body):
    return requests.post(url + "/v1/chat/completions", json={"model": "vanilla"} | body, headers=HEADERS, timeout=300)


def _ok(url, **body) -> dict:
    response = _chat(url, **body)
    assert response.status_code == 200, response.text
    return response.json()


def _events(url, **body) -> list:
    """The data payloads of a streamed answer, in order ("[DONE]" as a string)."""
    response = requests.post(url + "/v1/chat/completions", json={"model": "vanilla", "stream": True} | body,
                             headers=HEADERS, timeout=300, stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def _teacher_forced_logprobs(model, processor, turns, tokens) -> list[float]:
    """Log-probabilities of `tokens` after the prompt, from one plain forward pass over prompt + tokens."""
    inputs = encode(processor, [GenerateJob("vanilla", turns)])
    extra = torch.tensor([tokens])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    start = inputs["input_ids"].shape[1] - len(tokens) - 1
    logprobs = torch.log_softmax(logits[start:start + len(tokens)], -1)
    return logprobs.gather(1, extra.T)[:, 0].tolist()


def test_one_user_turn_renders_as_the_evaluation_prompt(local, rows):
    _, processor = local
    for image in (rows[0]["image"], None):
        turn = Turn("user", rows[0]["question"], (image,) if image else ())
        assert render(processor, [turn]) == processor.prompt(rows[0]["question"], image is not None)


def test_system_and_multi_turn_conversation_with_images_in_two_turns(server, local, rows):
    model, processor = local
    messages = [{"role": "system", "content": "Answer about the player in the image."}, _user(rows[0]),
                {"role": "assistant", "content": "A player."}, _user(rows[1])]
    body = _ok(server, messages=messages, logprobs=True)
    turns = [Turn("system", messages[0]["content"]), Turn("user", rows[0]["question"], (rows[0]["image"],)),
             Turn("assistant", "A player."), Turn("user", rows[1]["question"], (rows[1]["image"],))]
    prompt = processor.tokenizer(render(processor, turns), add_special_tokens=False)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt)  # the whole conversation, both images' tokens included
    alone = _ok(server, messages=[_user(rows[1])])
    assert body["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + processor.image_tokens
    # The served answer is the greedy continuation of exactly that prompt.
    inputs = encode(processor, [GenerateJob("vanilla", turns)])
    output = model.generate(**inputs, generation_config=_greedy_config(processor, 12))
    assert body["choices"][0]["message"]["content"] == processor.decode(output[0, inputs["input_ids"].shape[1]:])


def test_usage_and_logprobs_are_the_models_real_scores(server, local, rows):
    model, processor = local
    body = _ok(server, messages=[_user(rows[0])], logprobs=True, top_logprobs=5)
    choice, usage = body["choices"][0], body["usage"]
    entries = choice["logprobs"]["content"]
    # As OpenAI: the end-of-turn token is not a message content token, nor counted as a completion token.
    assert choice["finish_reason"] == "stop" and "<|im_end|>" not in [e["token"] for e in entries]
    assert usage["completion_tokens"] == len(entries) > 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "".join(e["token"] for e in entries).strip() == choice["message"]["content"]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])  # greedy: the top-1 token
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]) == entry["token"].encode()
    tokens = [processor.tokenizer.convert_tokens_to_ids("".join(UNICODE[b] for b in e["bytes"])) for e in entries]
    turns = [Turn("user", rows[0]["question"], (rows[0]["image"],))]
    forced = _teacher_forced_logprobs(model, processor, turns, tokens + [processor.end_id])
    assert [e["logprob"] for e in entries] == pytest.approx(forced[:-1], abs=1e-4)
    assert forced[-1] > -1  # the end-of-turn token was generated (greedy) after the content
    no_logprobs = _ok(server, messages=[_user(rows[0])])
    assert no_logprobs["choices"][0]["logprobs"] is None and no_logprobs["usage"] == usage
    assert no_logprobs["choices"][0]["message"] == choice["message"]


def _timed_events(url, **body) -> list[tuple[float, object]]:
    """(arrival time, payload) of each server-sent event of a streamed answer, as it arrives."""
    response = requests.post(url + "/v1/chat/completions", json={"model": "vanilla", "stream": True} | body,
                             headers=HEADERS, timeout=300, stream=True)
    assert response.status_code == 200, response.text
    events = []
    for line in response.iter_lines(chunk_size=1, decode_unicode=True):
        if line:
            events.append((time.perf_counter(), line[6:] if line == "data: [DONE]" else json.loads(line[6:])))
    return events


def test_stream_sends_openai_chunks_that_add_up_to_the_greedy_answer(server, rows):
    messages = [_user(rows[0])]
    whole = _ok(server, messages=messages)
    events = _events(server, messages=messages, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(deltas) == whole["choices"][0]["message"]["content"]
    assert 2 <= len(deltas) <= whole["usage"]["completion_tokens"]  # token by token (steps merge when the reader lags)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == whole["choices"][0]["finish_reason"] and not any(reasons[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]  # include_usage: the last chunk
    plain = _events(server, messages=messages)
    assert all("usage" not in c for c in plain[:-1]) and plain[-1] == "[DONE]"


def test_stream_sends_each_token_as_it_is_generated(server, rows):
    """Tokens reach the client while the generation goes on: one content delta per decoding step (a
    long sampled answer), the first long before the finish chunk, in order; the deltas and their
    log-probabilities add up to the non-streamed answer."""
    messages = [_user(rows[0])]
    for seed in range(20):  # a sampled answer long enough to watch (the end of turn may come early)
        sampled = dict(messages=messages, temperature=2, seed=seed, max_tokens=120, logprobs=True)
        whole = _ok(server, **sampled)["choices"][0]
        if len(whole["logprobs"]["content"]) >= 30:
            break
    events = _timed_events(server, **sampled)
    contents = [(t, e["choices"][0]) for t, e in events
                if e != "[DONE]" and "role" not in e["choices"][0]["delta"] and not e["choices"][0]["finish_reason"]]
    finish = next(t for t, e in events if e != "[DONE]" and e["choices"][0]["finish_reason"])
    # One delta per decoding step, fewer when steps merge because the reader lags (a busy machine).
    assert len(contents) >= 5, f"{len(contents)} content deltas for {len(whole['logprobs']['content'])} tokens"
    assert contents[0][0] < contents[len(contents) // 2][0] < finish  # the first arrived while generation went on
    assert "".join(c["delta"]["content"] for _, c in contents) == whole["message"]["content"]
    assert [e for _, c in contents for e in c["logprobs"]["content"]] == whole["logprobs"]["content"]


def test_stop_truncates_at_the_first_stop_string(server, rows):
    messages = [_user(rows[0])]
    whole = _ok(server, messages=messages)
    answer = whole["choices"][0]["message"]["content"]
    word = answer.split()[1]
    cut = _ok(server, messages=messages, stop=["@@", f" {word}"], logprobs=True)
    choice = cut["choices"][0]
    assert choice["message"]["content"] == answer[:answer.index(f" {word}")] and choice["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] == len(choice["logprobs"]["content"]) < whole["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in choice["logprobs"]["content"]).startswith(choice["message"]["content"])
    streamed = _events(server, messages=messages, stop=f" {word}")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1]) == choice["message"]["content"]
    assert _ok(server, messages=messages, stop="@@")["choices"] == whole["choices"]  # absent: no effect


def test_sampling_is_real_and_reproducible_with_a_seed(server, rows):
    messages = [_user(rows[0])]
    greedy = _ok(server, messages=messages, max_tokens=24)["choices"][0]["message"]["content"]
    first = _ok(server, messages=messages, temperature=1.5, top_p=0.95, seed=11, max_tokens=24)
    again = _ok(server, messages=messages, temperature=1.5, top_p=0.95, seed=11, max_tokens=24)
    assert first["choices"] == again["choices"]
    both = _ok(server, messages=messages, temperature=1.5, top_p=0.95, seed=11, n=2, max_tokens=24, logprobs=True)
    assert len(both["choices"]) == 2 and both["choices"][0]["message"] == first["choices"][0]["message"]
    assert both["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in both["choices"])
    assert both["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]  # counted once, as OpenAI does
    samples = {_ok(server, messages=messages, temperature=2, seed=s, max_tokens=24)["choices"][0]["message"]["content"]
               for s in range(4)}
    assert samples - {greedy}, "temperature 2 answered greedily for every seed"
    assert _ok(server, messages=messages, temperature=0, seed=3, max_tokens=24)["choices"][0]["message"]["content"] == greedy


def test_model_routes(server):
    card = requests.get(server + "/v1/models/vanilla", headers=HEADERS, timeout=30)
    assert card.status_code == 200 and card.json() == {"id": "vanilla", "object": "model", "owned_by": "offside", "kind": "full"}
    missing = requests.get(server + "/v1/models/nope", headers=HEADERS, timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert requests.get(server + "/v1/models/vanilla", timeout=30).status_code == 401


BAD = [  # (body changes, status, what the message must name)
    ({"n": 2}, 400, "n"), ({"n": 0}, 400, "n"), ({"n": 9, "temperature": 1}, 400, "n"),
    ({"temperature": 5}, 400, "temperature"), ({"temperature": -0.1}, 400, "temperature"),
    ({"temperature": "1"}, 400, "temperature"), ({"top_p": 1.5}, 400, "top_p"), ({"top_p": -1}, 400, "top_p"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, 400, "max_completion_tokens"),
    ({"max_completion_tokens": 0}, 400, "max_tokens"), ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": ""}, 400, "stop"), ({"stop": 5}, 400, "stop"), ({"seed": 2**70, "temperature": 1}, 400, "seed"),
    ({"seed": 1.5}, 400, "seed"), ({"tools": [{"type": "function"}]}, 400, "tools"), ({"tool_choice": "auto"}, 400, "tool_choice"),
    ({"frequency_penalty": 1}, 400, "frequency_penalty"), ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"logit_bias": {"12": 3}}, 400, "logit_bias"), ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"), ({"top_k": 5}, 400, "top_k"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, 400, "last message"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "QUJD"}}]},
                   {"role": "user", "content": "q"}]}, 400, "user messages only"),
    ({"messages": [{"role": "assistant", "content": "a", "tool_calls": []}, {"role": "user", "content": "q"}]}, 400, "tool_calls"),
    ({"model": "nope"}, 404, "nope"),
]


@pytest.mark.parametrize("change,status,named", BAD, ids=[next(iter(c)) + str(i) for i, (c, _, _) in enumerate(BAD)])
def test_bad_parameters_get_a_clear_openai_error(server, change, status, named):
    response = _chat(server, **({"messages": [{"role": "user", "content": "Who is this?"}]} | change))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert named in error["message"] and error["type"] and error["code"] == status


@pytest.mark.parametrize("raw,named", [(b"NaN", "NaN"), (b'{"model": "vanilla", "temperature": NaN}', "NaN"),
                                       (b'{"model": "vanilla", "top_p": Infinity}', "Infinity"),
                                       (b'{"model": "vanilla", "top_p": 1e999}', "1e999"), (b'{"model": ', "JSON")])
def test_a_body_that_is_not_json_is_a_400_naming_the_problem(server, raw, named):
    response = requests.post(server + "/v1/chat/completions", data=raw, timeout=30,
                             headers=HEADERS | {"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "not valid JSON" in response.json()["error"]["message"] and named in response.json()["error"]["message"]


def test_healthz_answers_while_a_batch_computes(server, rows):
    """The probe replica computes on its own thread: its event loop answers /healthz's ping meanwhile
    (with the compute on the loop, a poll waited for the batch: ~1.4 s here). Measured side by side,
    not against a clock: a blocked loop makes a ping wait about as long as the busy period."""
    images = [{"type": "image_url", "image_url": {"url": _png(r["image"])}} for r in rows * 2]
    heavy = {"messages": [{"role": "user", "content": images + [{"type": "text", "text": rows[0]["question"] * 30}]}],
             "temperature": 2, "n": 4, "max_tokens": 200}
    with ThreadPoolExecutor(12) as pool:
        started = time.perf_counter()
        busy = [pool.submit(_ok, server, seed=4 * s, **heavy) for s in range(12)]
        latencies = []
        while not all(f.done() for f in busy):
            t = time.perf_counter()
            assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"
            latencies.append(time.perf_counter() - t)
            time.sleep(0.05)
        busy_s = time.perf_counter() - started
        assert all(len(f.result()["choices"]) == 4 for f in busy)
    assert len(latencies) >= 5 and max(latencies) < busy_s / 4, (sorted(latencies)[-5:], busy_s)


def test_the_official_openai_client_chats_streams_and_gets_clear_errors(server, rows):
    """What a user of vLLM or Ray Serve LLM does, with OpenAI's own Python client."""
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key=TOKEN, max_retries=0)
    messages = [{"role": "system", "content": "Answer about the player in the image."}, _user(rows[0]),
                {"role": "assistant", "content": "A player."}, _user(rows[1])]
    answer = client.chat.completions.create(model="vanilla", messages=messages, logprobs=True, top_logprobs=2)
    choice = answer.choices[0]
    assert answer.usage.completion_tokens == len(choice.logprobs.content) and choice.message.content
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob == e.logprob for e in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="vanilla", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    sampled = [client.chat.completions.create(model="vanilla", messages=messages, temperature=1.0, seed=7, n=2)
               for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert client.models.retrieve("vanilla").id == "vanilla"
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="vanilla", messages=messages, n=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def _completion(url, **body):
    return requests.post(url + "/v1/completions", json={"model": "vanilla"} | body, headers=HEADERS, timeout=300)


def _raw_logprobs(model, ids: list[int]) -> list[float]:
    """Log-probability of each token after the ones before it, from one plain forward pass."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), mm_token_type_ids=torch.zeros_like(tokens)).logits[0]
    return torch.log_softmax(logits[:-1].float(), -1).gather(1, tokens[0, 1:, None])[:, 0].tolist()


def test_completions_echo_scores_the_prompt_as_evaluation_harnesses_ask(server, local, rows):
    """`max_tokens: 0` + `echo`: the prompt's own token log-probabilities; lm-evaluation-harness's form
    (token-id prompts in a batch, `max_tokens: 1`, `logprobs: 1`) adds one generated entry after them."""
    model, processor = local
    prompt = processor.prompt(rows[0]["question"], False) + "His name is"
    ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response = _completion(server, prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    assert body["object"] == "text_completion" and choice["text"] == prompt and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None and len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][1:] == pytest.approx(_raw_logprobs(model, ids), abs=1e-4)
    assert "".join(logprobs["tokens"]) == prompt and logprobs["text_offset"][-1] == len(prompt) - len(logprobs["tokens"][-1])
    for token, logprob, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert token in top and top[token] == logprob and 5 <= len(top) <= 6 and max(top.values()) <= 0
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    short = ids[:-3]
    harness = _completion(server, prompt=[ids, short], max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234).json()
    for choice, sent in zip(harness["choices"], (ids, short)):
        scores = choice["logprobs"]["token_logprobs"]
        assert len(scores) == len(sent) + 1 and scores[1:len(sent)] == pytest.approx(_raw_logprobs(model, sent), abs=1e-4)
    generated = _completion(server, prompt=processor.prompt(rows[0]["question"], False), max_tokens=12).json()["choices"][0]
    chat = _ok(server, messages=[{"role": "user", "content": rows[0]["question"]}], max_tokens=12)["choices"][0]
    assert generated["text"].strip() == chat["message"]["content"] and generated["finish_reason"] == chat["finish_reason"]


COMPLETION_BAD = [
    ({"max_tokens": 0}, 400, "echo"), ({"echo": True, "logprobs": 6}, 400, "logprobs"), ({"stream": True}, 400, "stream"),
    ({"suffix": "x"}, 400, "suffix"), ({"best_of": 3}, 400, "best_of"), ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"), ({"prompt": [10**7]}, 400, "token ids"), ({"prompt": "<|image_pad|> x"}, 400, "vision"),
    ({"prompt": ["q"] * 65}, 400, "prompt"), ({"n": 2}, 400, "n"), ({"temperature": 5}, 400, "temperature"),
    ({"prompt": 5}, 400, "prompt"), ({"prompt": [1.5]}, 400, "prompt"), ({"logit_bias": {"1": 2}}, 400, "logit_bias"),
    ({"prompt": "x" * 4001}, 413, "prompt"), ({"prompt": list(range(5, 10)) * 500}, 413, "tokens"),
    ({"top_logprobs": 2}, 400, "top_logprobs"), ({"model": "nope"}, 404, "nope"),
]


@pytest.mark.parametrize("change,status,named", COMPLETION_BAD, ids=[next(iter(c)) + str(i) for i, (c, _, _) in enumerate(COMPLETION_BAD)])
def test_completions_bad_parameters_get_a_clear_openai_error(server, change, status, named):
    response = _completion(server, **({"prompt": "Who is this?"} | change))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert named in error["message"] and error["code"] == status


def _log_text() -> str:
    from serve.local import logs_dir

    return "\n".join(p.read_text(errors="replace") for p in logs_dir().rglob("*") if p.is_file() and p.suffix in (".log", ".err", ".out"))


def _sse(url, body) -> requests.Response:
    response = requests.post(url + "/v1/chat/completions", json={"model": "vanilla", "stream": True} | body,
                             headers=HEADERS, timeout=300, stream=True)
    assert response.status_code == 200, response.text
    return response


def test_a_client_leaving_mid_stream_stops_cleanly(server, rows):
    """The client closes the connection after a few deltas: the server goes on serving, and no task is
    left with an exception nobody retrieved (asyncio's 'Task exception was never retrieved')."""
    long = {"messages": [_user(rows[0])], "temperature": 2, "max_tokens": 200}
    for attempt, n in enumerate((1, 2, 1, 2)):
        response = _sse(server, long | {"n": n, "seed": attempt})
        contents = 0
        for line in response.iter_lines(chunk_size=1, decode_unicode=True):
            contents += '"content": "' in line and '"role"' not in line
            if contents >= 3:
                break
        response.close()
    time.sleep(3)  # the proxy sees the disconnect, cancels the ingress request and its replica calls
    assert _ok(server, messages=[_user(rows[0])])["choices"][0]["finish_reason"] == "stop"
    logs = _log_text()
    assert "disconnected, cancelling request" in logs  # the proxy saw the clients leave
    assert "Task exception was never retrieved" not in logs and "exception was never retrieved" not in logs


def test_a_probe_replica_killed_under_load_answers_503_with_retry_after(server, rows):
    """Runs last in the module: the in-flight requests of a killed replica get a retryable 503 with
    Retry-After and no internals (a stream: an error event with code 503), the failure is logged on
    the server, and Serve's new replica answers afterwards."""
    import ray

    heavy = {"messages": [_user(rows[0])], "temperature": 2, "max_tokens": 256, "n": 8}
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Probe#" in a["name"]]
    with ThreadPoolExecutor(12) as pool:
        plain = [pool.submit(_chat, server, seed=s, **heavy) for s in range(12)]
        lines = _sse(server, heavy | {"n": 1, "seed": 99}).iter_lines(chunk_size=1, decode_unicode=True)
        stream_lines = []
        for line in lines:  # the stream is being generated when its first content delta arrives: kill then
            stream_lines.append(line)
            if '"content": "' in line and '"role"' not in line:
                break
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        stream_lines += [line for line in lines if line]
        answers = [f.result() for f in plain]
    failed = [r for r in answers if r.status_code != 200]
    assert failed, "every request finished before the replica was killed"
    for response in failed:
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
        assert "Error" not in response.text and "retry" in response.json()["error"]["message"]
    error = json.loads(next(line for line in stream_lines if line.startswith('data: {"error"'))[6:])["error"]
    assert error["code"] == 503 and "Error" not in json.dumps(error) and stream_lines[-1] == "data: [DONE]"
    assert "answering failed, the client may retry" in _log_text()
    deadline = time.time() + 300
    while time.time() < deadline:
        health = requests.get(server + "/healthz", timeout=30)
        if health.status_code == 200:
            break
        assert health.status_code == 503 and "Error" not in health.text
        time.sleep(2)
    assert _ok(server, messages=[_user(rows[0])])["choices"][0]["finish_reason"] == "stop"
