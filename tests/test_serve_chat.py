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
from serve.chat import Turn, encode, render
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
    inputs = encode(processor, [turns])
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
    inputs = encode(processor, [turns])
    output = model.generate(**inputs, generation_config=_greedy_config(processor, 12))
    assert body["choices"][0]["message"]["content"] == processor.decode(output[0, inputs["input_ids"].shape[1]:])


def test_usage_and_logprobs_are_the_models_real_scores(server, local, rows):
    model, processor = local
    body = _ok(server, messages=[_user(rows[0])], logprobs=True, top_logprobs=5)
    choice, usage = body["choices"][0], body["usage"]
    entries = choice["logprobs"]["content"]
    assert choice["finish_reason"] == "stop" and entries[-1]["token"] == "<|im_end|>"  # the end token counts
    assert usage["completion_tokens"] == len(entries) > 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "".join(e["token"] for e in entries[:-1]).strip() == choice["message"]["content"]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])  # greedy: the top-1 token
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]) == entry["token"].encode()
    tokens = [processor.tokenizer.convert_tokens_to_ids("".join(UNICODE[b] for b in e["bytes"])) for e in entries]
    forced = _teacher_forced_logprobs(model, processor, [Turn("user", rows[0]["question"], (rows[0]["image"],))], tokens)
    assert [e["logprob"] for e in entries] == pytest.approx(forced, abs=1e-4)
    no_logprobs = _ok(server, messages=[_user(rows[0])])
    assert no_logprobs["choices"][0]["logprobs"] is None and no_logprobs["usage"] == usage
    assert no_logprobs["choices"][0]["message"] == choice["message"]


def test_stream_sends_openai_chunks_that_add_up_to_the_greedy_answer(server, rows):
    messages = [_user(rows[0])]
    whole = _ok(server, messages=messages)
    events = _events(server, messages=messages, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == whole["choices"][0]["finish_reason"] and not any(reasons[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]  # include_usage: the last chunk
    plain = _events(server, messages=messages)
    assert all("usage" not in c for c in plain[:-1]) and plain[-1] == "[DONE]"


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
    (with the compute on the loop, a poll waited for the batch: ~1.4 s here)."""
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
    assert len(latencies) >= 5 and max(latencies) < 1.0, (sorted(latencies)[-5:], busy_s)


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
