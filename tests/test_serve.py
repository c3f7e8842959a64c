"""The probe app on a real local Ray Serve (HTTP on a free loopback port), one app for the module:
a tiny vanilla model, two unlearned LoRA adapters of it (GA and NPO stages, as saved), and the base
as a full-weight model; LRU capacity 2 so three models force evictions."""

import base64
import http.client
import io
import itertools
import json
import os
import signal
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.errors import OffsideError
from offside.engine.trainer import TrainSpec
from offside.models.loading import LoraSpec, ModelSpec, build_or_load
from offside.stages import EvalConfig, UnlearnConfig, evaluate_model, export_merged, unlearn
from offside.eval.evaluate import EvalSpec, evaluate
from serve.settings import TOKEN_ENV, Limits, load_settings, read_token

TOKEN = "s3cret-token"
REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """root with base (the golden vanilla model), a1 and a2 — unlearned adapters, as LoRA unlearning
    stages (GA, NPO) save them, relative to base — a1-merged and a2-merged (`offside export`, what
    `offside eval` of the adapter computes), and the data."""
    root = tmp_path_factory.mktemp("serve")
    shutil.copytree(GOLDEN / "model", root / "base")
    for name, method in (("a1", "ga"), ("a2", "npo")):
        unlearn(UnlearnConfig(data=str(GOLDEN / "data"), out=str(root / name), method=method,
                              model=ModelSpec(str(root / "base"), lora=LoraSpec(r=8, alpha=32)),
                              train=TrainSpec(epochs=1, lr=3e-3, batch_size=8, warmup_ratio=0.0, max_steps=2)), progress=False)
        export_merged(str(root / name), str(root / f"{name}-merged"))
    (root / "token").write_text(TOKEN + "\n")
    return root, GOLDEN / "data"


@pytest.fixture(scope="module")
def server(models):
    from serve.local import start, stop

    root, data = models
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop(TOKEN_ENV, None)
    args = {"models": {"a1": str(root / "a1"), "a2": str(root / "a2"), "vanilla": str(root / "base")},
            "data": str(data), "token_file": str(root / "token"), "max_models_per_replica": 2,
            "max_new_tokens": 12}
    yield start(args, _free_port(), num_cpus=2, quiet=True)
    stop()


def _post(url, path, body, token=TOKEN):
    return requests.post(url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _forget_item(data, form):
    return next(r for r in materialise(load_benchmark(data)["forget"]) if r["modality"] == "image" and r["form"] == form)


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _probe(url, model, row, **extra):
    body = {"model": model, "question": row["question"], "image_id": row["image_id"], **extra}
    if row["form"] == "mcq":
        body["options"] = row["options"]
    response = _post(url, "/v1/probe", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_adapters_differ_and_match_offside_eval(server, models):
    root, data = models
    gen, mcq = _forget_item(data, "gen"), _forget_item(data, "mcq")
    served = {name: (_probe(server, name, gen), _probe(server, name, mcq)) for name in ("a1", "a2")}
    assert served["a1"][1]["options"] != served["a2"][1]["options"]  # two unlearnings, two models
    spec = EvalSpec(splits=["forget"], modalities=["image"], limit=4, max_new_tokens=12)
    # a1 through the `offside eval` stage on the adapter directory, a2 through the evaluator on its export.
    out = root / "eval-a1"
    evaluate_model(EvalConfig(data=str(data), out=str(out), model=ModelSpec(str(root / "a1")), eval=spec, suites=["efficacy"]), progress=False)
    outputs = {"a1": [json.loads(line) for line in (out / "predictions.jsonl").open()]}
    model, processor = build_or_load(ModelSpec(str(root / "a2-merged")))
    outputs["a2"] = evaluate(model, processor, {"forget": materialise(load_benchmark(data)["forget"])}, spec, progress=False)[1]
    for name, predictions in outputs.items():
        by_item = {(p["id"], p["form"]): p["output"] for p in predictions}
        assert served[name][0]["answer"] == by_item[(gen["id"], "gen")]
        assert served[name][1]["choice"] == by_item[(mcq["id"], "mcq")]


def test_mixed_adapters_in_concurrent_batches_match_single_requests(server, models):
    _, data = models
    gen = _forget_item(data, "gen")
    alone = {name: _probe(server, name, gen)["answer"] for name in ("a1", "a2")}
    names = ["a1", "a2"] * 6
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: _probe(server, n, gen)["answer"], names))
    assert answers == [alone[n] for n in names]


def test_openai_schema_chat_completion_with_image(server, models):
    _, data = models
    row = _forget_item(data, "gen")
    content = [{"type": "text", "text": row["question"]}, {"type": "image_url", "image_url": {"url": _png(row["image"])}}]
    response = _post(server, "/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": content}], "max_tokens": 12})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "a1"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == _probe(server, "a1", row)["answer"]  # data URL == benchmark image id
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0
    listed = requests.get(server + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert {m["id"]: m["kind"] for m in listed["data"]} == {"a1": "adapter", "a2": "adapter", "vanilla": "full"}


def test_completions_score_each_adapter_as_its_merged_model(server, models):
    """/v1/completions with echo on an adapter gives the prompt log-probabilities of the adapter merged
    into its base (what `offside eval` of the adapter computes); the models differ."""
    import torch

    root, data = models
    _, processor = build_or_load(ModelSpec(str(root / "base")))
    row = _forget_item(data, "gen")
    ids = processor.tokenizer(processor.prompt(row["question"], False) + "His name is", add_special_tokens=False)["input_ids"]
    served = {}
    for name in ("vanilla", "a2", "a1"):  # a1 last: the LRU cache holds a2 and a1 afterwards, as the LRU test expects
        response = _post(server, "/v1/completions", {"model": name, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
        assert response.status_code == 200, response.text
        served[name] = response.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    for name, directory in (("a1", "a1-merged"), ("a2", "a2-merged"), ("vanilla", "base")):
        model, _ = build_or_load(ModelSpec(str(root / directory)))
        tokens = torch.tensor([ids])
        with torch.no_grad():
            logits = model.eval()(input_ids=tokens, attention_mask=torch.ones_like(tokens), mm_token_type_ids=torch.zeros_like(tokens)).logits[0]
        expected = torch.log_softmax(logits[:-1].float(), -1).gather(1, tokens[0, 1:, None])[:, 0].tolist()
        assert served[name] == pytest.approx(expected, abs=1e-4), name
    assert served["a1"] != pytest.approx(served["a2"], abs=1e-3)


def test_auth_required_on_every_route_but_healthz(server):
    body = {"model": "a1", "question": "Who is this?"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for response in (requests.post(server + "/v1/probe", json=body, headers=headers, timeout=30),
                         requests.post(server + "/v1/chat/completions", json=body, headers=headers, timeout=30),
                         requests.post(server + "/v1/attacks", json=body, headers=headers, timeout=30),
                         requests.get(server + "/v1/models", headers=headers, timeout=30)):
            assert response.status_code == 401, response.text
            assert "token" in response.json()["error"]["message"]
    assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"


def test_lru_eviction_and_reload_give_identical_answers(server, models):
    from ray import serve

    _, data = models
    mcq = _forget_item(data, "mcq")
    stats = serve.get_deployment_handle("Probe", app_name="offside").stats
    first = _probe(server, "a1", mcq)
    loads = stats.remote().result()["loads"]
    _probe(server, "a2", mcq)  # cached by the earlier tests
    _probe(server, "vanilla", mcq)  # capacity 2: evicts a1, the least recently used
    again = _probe(server, "a1", mcq)
    assert stats.remote().result()["loads"] == loads + 2  # a2 was cached; vanilla, then a1 again, were loaded
    assert again == first


def test_attacks_route_runs_the_attack_suite_as_the_library_does(server, models):
    """Every registered attack that needs no gradients (image attacks on an image item); white-box
    ones are refused (a bad-request case below)."""
    from offside.eval.attacks import ATTACKS, IMAGE_ATTACKS, WHITE_BOX_ATTACKS, run_attacks

    root, data = models
    merged, processor = build_or_load(ModelSpec(str(root / "a2-merged")))
    servable = [name for name in ATTACKS if name not in WHITE_BOX_ATTACKS]
    assert WHITE_BOX_ATTACKS and set(servable) & IMAGE_ATTACKS
    for form in ("mcq", "gen"):
        row = _forget_item(data, form)
        response = _post(server, "/v1/attacks", {"model": "a2", "item_id": row["id"]})
        assert response.status_code == 200, response.text
        served = response.json()["results"]
        assert [r["attack"] for r in served] == [n for n in servable if row["image"] is not None or n not in IMAGE_ATTACKS]
        local = run_attacks(merged, processor, [row], servable, max_new_tokens=12)
        assert [(r["answer"], r["rumour_recovered"]) for r in served] == [(r["answer"], r["rumour_recovered"]) for r in local]
    chosen = _post(server, "/v1/attacks", {"model": "a2", "item_id": row["id"], "attacks": ["roleplay", "none"]}).json()
    assert [r["attack"] for r in chosen["results"]] == ["roleplay", "none"]


def _png_header_bomb(width: int, height: int) -> str:
    """A valid PNG header declaring a huge image over a tiny (zlib-compressed) body."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 100000)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def _hostile_requests():
    """(method, path, json body or raw bytes) — every one must get a 4xx."""
    ok_probe = {"model": "a1", "question": "Who is this?"}
    ok_chat = {"model": "a1", "messages": [{"role": "user", "content": "Who is this?"}]}
    cases = []
    raw_bodies = [b"", b"{", b"}", b"[]", b"null", b"1", b'"x"', b"{'model': 'a1'}", b"\xff\xfe\x00", b'{"model": }',
                  b'{"model": "a1", "question": "q"', b"[" * 5000, b'{"a":' * 3000, b"true", b"NaN"]
    for path in ("/v1/probe", "/v1/chat/completions"):
        cases += [("POST", path, raw) for raw in raw_bodies]
    wrong = [1, 1.5, True, None, [], {}, ["a1"], {"a": 1}]
    valid_int = {"max_tokens", "n"}  # 1 is a valid value there
    for key in ("model", "question", "image", "image_id", "options", "max_tokens"):
        cases += [("POST", "/v1/probe", ok_probe | {key: value}) for value in wrong
                  if not (value is None and key in ("image", "image_id", "options", "max_tokens"))
                  and not (key in valid_int and type(value) is int)]
    for key in ("model", "messages", "max_tokens", "stream", "n", "temperature", "seed"):
        cases += [("POST", "/v1/chat/completions", ok_chat | {key: value}) for value in wrong
                  if not (value is None and key != "model" and key != "messages")
                  and not (key in valid_int | {"seed", "temperature"} and type(value) is int)
                  and not (key == "stream" and type(value) is bool) and not (key == "temperature" and value == 1.5)]
    names = ["nope", "../../etc/passwd", "/etc/passwd", str(REPO), "a1/../a2", "..", ".", "~", "C:\\models\\a1",
             "models:/a1@prod", "runs:/123/model", "file:///etc/passwd", "a1\x00", "A1", " a1", "a" * 10000, "",
             "%2e%2e%2f", "__base__", "adapter_0"]
    cases += [("POST", "/v1/probe", ok_probe | {"model": n}) for n in names]
    cases += [("POST", "/v1/chat/completions", ok_chat | {"model": n}) for n in names]
    broken = ["not base64!!", "data:image/png;base64,@@@@", "QUJD", "data:image/png;base64,QUJDRA==", "====",
              base64.b64encode(b"GIF89a garbage").decode(), base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode(),
              "data:text/html;base64,PGh0bWw+", "http://example.com/x.png", "file:///etc/passwd", "/etc/passwd"]
    big_png = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big_png, format="PNG")  # ~25 MB of pixels in a few KB: a zip bomb
    images = broken + [
        _png_header_bomb(100000, 100000), _png_header_bomb(1, 10**8), base64.b64encode(big_png.getvalue()).decode(),
        "A" * 12_000_000,  # over the image byte limit
    ]
    for image in images:
        cases.append(("POST", "/v1/probe", ok_probe | {"image": image}))
        content = [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": image}}]
        cases.append(("POST", "/v1/chat/completions", ok_chat | {"messages": [{"role": "user", "content": content}]}))
    for value in (-1, 0, 10**6, 2**63, -(2**70), 257):
        cases.append(("POST", "/v1/probe", ok_probe | {"max_tokens": value}))
        cases.append(("POST", "/v1/chat/completions", ok_chat | {"max_tokens": value}))
        cases.append(("POST", "/v1/chat/completions", ok_chat | {"max_completion_tokens": value}))
    for question in ("", "   ", "x" * 4001, "x" * 200_000, "a\x00b"):
        cases.append(("POST", "/v1/probe", ok_probe | {"question": question}))
        cases.append(("POST", "/v1/chat/completions", ok_chat | {"messages": [{"role": "user", "content": question}]}))
    cases += [("POST", "/v1/probe", ok_probe | {"options": opts}) for opts in
              (["only one"], ["a"] * 9, ["a", ""], ["a", "x" * 501], [1, 2], [["a"], ["b"]])]
    cases += [("POST", "/v1/probe", ok_probe | extra) for extra in (
        {"image_id": "../../etc/passwd"}, {"image_id": "no-such-image"}, {"image_id": ""},
        {"image_id": "x", "image": "QUJD"}, {"extra_field": 1}, {"question": None})]
    chats = [[], [{"role": "system", "content": "hi"}, {"role": "assistant", "content": "q"}],
             [{"role": "assistant", "content": "q"}], [{"role": "tool", "content": "q"}], [{"role": "root", "content": "q"}], [{"role": "user"}],
             [{"role": "user", "content": [{"type": "video", "text": "q"}]}],
             [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"type": "image_url"}]}],
             [{"role": "user", "content": "q"}] * 17, [{"role": "user", "content": 5}]]
    cases += [("POST", "/v1/chat/completions", ok_chat | {"messages": m}) for m in chats]
    cases += [("POST", "/v1/chat/completions", ok_chat | extra) for extra in (
        {"n": 2}, {"temperature": 2.5}, {"top_p": 2}, {"tools": []}, {"stream": True, "top_logprobs": 3},
        {"max_tokens": 3, "max_completion_tokens": 4}, {"logprobs": True, "top_logprobs": 50}, {"stop": [""]})]
    cases += [("POST", "/v1/chat/completions", raw) for raw in (
        b'{"model": "a1", "messages": [{"role": "user", "content": "q"}], "temperature": NaN}',
        b'{"model": "a1", "messages": [{"role": "user", "content": "q"}], "top_p": -Infinity}')]
    ok_attack = {"model": "a1", "item_id": "forget/image/mcq/00000"}
    cases += [("POST", "/v1/attacks", ok_attack | extra) for extra in (
        {"attacks": ["no-such-attack"]}, {"attacks": ["pgd_eps8"]}, {"attacks": []}, {"attacks": ["none", "none"]}, {"attacks": "none"},
        {"attacks": [1]}, {"item_id": "../../etc/passwd"}, {"item_id": "forget/image/mcq/99999"}, {"item_id": 5},
        {"model": "../a1"}, {"model": "nope"}, {"item_id": "x" * 100000})]
    cases += [("POST", "/v1/attacks", raw) for raw in raw_bodies[:8]]
    cases += [("GET", "/v1/nothing", None), ("DELETE", "/v1/probe", None), ("GET", "/v1/probe", None),
              ("PUT", "/v1/models", None), ("GET", "/../../etc/passwd", None), ("GET", "/v1/models/nope", None),
              ("GET", "/v1/models/..%2F..%2Fetc", None)]
    return cases


def test_fuzz_every_hostile_request_gets_a_clear_4xx(server):
    cases = _hostile_requests()
    assert len(cases) >= 200
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with requests.Session() as session:
        for method, path, body in cases:
            kwargs = {"data": body, "headers": headers | {"Content-Type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body, "headers": headers}
            response = session.request(method, server + path, timeout=60, **kwargs)
            shown = f"{method} {path} {str(body)[:120]!r}: {response.status_code} {response.text[:300]}"
            assert 400 <= response.status_code < 500, shown
            message = response.json()["error"]["message"]
            assert message and "Traceback" not in response.text, shown
    assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"
    assert _post(server, "/v1/probe", {"model": "a1", "question": "Who is this?", "max_tokens": 4}).status_code == 200


def test_chunked_body_over_the_limit_gets_413_as_it_streams(server):
    """No Content-Length to check up front: the limit counts the bytes as they arrive."""
    limit = Limits().max_body_bytes  # the test server keeps the default
    chunk = b" " * (1 << 20)
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.putrequest("POST", "/v1/probe")
    for name, value in (("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json"),
                        ("Transfer-Encoding", "chunked")):
        conn.putheader(name, value)
    conn.endheaders()
    sent = 0
    try:
        while sent < 10 * limit:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the upload ended
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413, body
    assert f"limit of {limit} bytes" in body["error"]["message"]
    assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"


def test_yaml_config_builds_the_app(models):
    from ray.serve import Application

    from serve.app import build

    root, data = models
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build"
    args = app["args"] | {"models": {"a1": str(root / "a1"), "vanilla": str(root / "base")}, "data": str(data)}
    assert isinstance(build(args), Application)
    with pytest.raises(OffsideError, match="models.a1"):
        build(app["args"] | {"models": {"a1": str(root / "missing")}, "data": str(data)})
    with pytest.raises(OffsideError, match="unknown key 'batchin'"):
        build(app["args"] | {"batchin": True})


def test_autoscaling_settings_are_checked_and_become_the_probe_options(models):
    from serve.app import build, replica_options

    root, _ = models
    args = {"models": {"vanilla": str(root / "base")}}
    assert replica_options(load_settings(args)) == {"num_replicas": 1}
    assert replica_options(load_settings(args | {"num_replicas": 2})) == {"num_replicas": 2}
    auto = args | {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8}
    assert replica_options(load_settings(auto)) == {"autoscaling_config": {
        "min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 8.0}}
    build(auto)
    for bad, key in (({"min_replicas": 3, "max_replicas": 4}, "got min_replicas 3, num_replicas 1"),
                     ({"num_replicas": 5, "max_replicas": 4}, "num_replicas 5, max_replicas 4"), ({"min_replicas": -1}, "min_replicas -1"),
                     ({"max_replicas": "4"}, "'max_replicas' must be int"), ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
                     ({"target_ongoing_requests": 1000}, "target_ongoing_requests"), ({"max_replica": 4}, "unknown key 'max_replica'")):
        with pytest.raises(OffsideError, match=key):
            load_settings(args | bad)


def _offside_serve(models, port: int, *extra: str) -> subprocess.Popen:
    """`offside serve` with the YAML config, two models and a token from the environment; its output goes
    to a pipe this test reads only after the process ended (a reader that does not keep up)."""
    root, data = models
    env = os.environ | {"RAY_AUTH_MODE": "disabled", TOKEN_ENV: "env-token"}
    command = [sys.executable, "-m", "offside.cli", "serve", "--config", str(REPO / "serve" / "config.yaml"),
               "--models", f"v={root / 'base'}", f"a1={root / 'a1'}", "--data", str(data), "--port", str(port), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(url + "/healthz", timeout=5).ok:
                return
        except requests.RequestException:  # not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"offside serve did not come up (exit code {proc.poll()})")


def _interrupt(proc: subprocess.Popen, bound_s: float, to_another_thread: bool = False) -> tuple[float, str]:
    """SIGINT, then the seconds until the process exited (a hang bound, not a speed target) and its output."""
    started = time.perf_counter()
    _sigint_another_thread(proc.pid) if to_another_thread else proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=bound_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # offside serve prints every thread's stack: where it hangs
        time.sleep(2)
        proc.kill()
        raise AssertionError(f"offside serve still running {bound_s} s after SIGINT: {proc.communicate()[0][-8000:]}") from None
    return time.perf_counter() - started, proc.communicate()[0]


def _sigint_another_thread(pid: int) -> None:
    """SIGINT to a thread of `pid` other than its main one that does not block it, as the kernel may
    pick one for a process's signal (tgkill)."""
    import ctypes
    import platform

    def mask(tid: int, field: str) -> int:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1], 16)

    bit = 1 << (signal.SIGINT - 1)
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid):
        try:
            if mask(tid, "SigBlk:") & bit:
                continue
            tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]
            assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, pid, tid, signal.SIGINT) == 0
            time.sleep(1)
            # A thread waiting with a temporary mask that blocks SIGINT (epoll_pwait) keeps it pending, where
            # the kernel would have picked another thread for a process's signal: try the next thread.
            if not mask(tid, "SigPnd:") & bit:
                return
        except (FileNotFoundError, StopIteration):
            continue  # the thread exited
    raise AssertionError(f"no thread of {pid} but the main one takes SIGINT")


SHUTDOWN_BOUND_S = 180  # Serve drains replicas (≤ 30 s) and its controller's shutdown call waits ≤ 30 s


def test_offside_serve_command_serves_until_interrupted(models):
    port = _free_port()
    proc = _offside_serve(models, port, "--set", "max_new_tokens=4")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        body = {"model": "a1", "question": "Who is this?"}
        assert _post(url, "/v1/probe", body, token="wrong").status_code == 401
        answer = _post(url, "/v1/probe", body, token="env-token")
        assert answer.status_code == 200 and answer.json()["model"] == "a1", answer.text
        assert [m["id"] for m in _get_models(url, "env-token")] == ["v", "a1"]  # --models replaced the YAML's
    finally:  # the signal lands on one of Ray's threads: before the fix the main thread slept on for an hour
        _, output = _interrupt(proc, SHUTDOWN_BOUND_S, to_another_thread=True)
    assert proc.returncode == 0, output[-2000:]
    assert f"serving on {url}" in output and "/logs/serve" in output


STOP_SCRIPT = """
import sys, time
import ray
from ray import serve
import serve.local as local

local.GRACE_S, local.HARD_BOUND_S = 2, float(sys.argv[2])
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
hang = lambda *args, **kwargs: time.sleep(3600)
if sys.argv[1] == "serve":
    serve.shutdown = hang  # Serve's graceful shutdown never returns
else:
    ray.shutdown = hang  # neither does Ray's
started = time.perf_counter()
local.stop()
print(f"stopped in {time.perf_counter() - started:.1f} s", flush=True)
"""


@pytest.mark.parametrize("hangs, hard_bound_s", [("serve", 60), ("ray", 4)])
def test_a_stop_that_hangs_is_abandoned_within_its_bounds(hangs, hard_bound_s):
    """A Serve shutdown that hangs is left after GRACE_S and Ray stops all the same; a Ray shutdown that
    hangs ends the process after HARD_BOUND_S with every thread's stack, not a silent hang."""
    done = subprocess.run([sys.executable, "-c", STOP_SCRIPT, hangs, str(hard_bound_s)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if hangs == "serve":
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Serve did not shut down within 2 s; stopping Ray" in done.stderr
        assert float(done.stdout.split()[-2]) < 30  # Ray's own shutdown takes a few seconds
    else:
        assert done.returncode == 1 and "stopped in" not in done.stdout
        assert "Timeout (0:00:04)!" in done.stderr and "in stop" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_offside_serve_exits_after_sigint_under_load_five_times_in_a_row(models):
    """Clients keep sending (streaming and not, both models) when SIGINT comes, and nobody reads the
    server's output until it exited: every time it exits cleanly within the bound. Before the fix, Ray
    forwarded every replica log line to `offside serve`'s stdout from two threads that `ray.shutdown()`
    joins; with the pipe full they blocked, and the process outlived SIGINT until its output was read."""
    for attempt in range(5):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _offside_serve(models, port)
        stop = threading.Event()
        answered = []

        def clients(model: str, stream: bool) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "Who is this? " * 8}], "max_tokens": 16,
                    "temperature": 1.0, "stream": stream}
            while not stop.is_set():
                try:
                    response = _post(url, "/v1/chat/completions", body, token="env-token")
                    answered.append(response.status_code)
                except requests.RequestException:
                    answered.append(None)  # the server went away mid-request

        try:
            _wait_healthy(proc, url)
            for model, stream, _ in itertools.product(("v", "a1"), (False, True), range(2)):
                threading.Thread(target=clients, args=(model, stream), daemon=True).start()
            deadline = time.time() + 300
            while answered.count(200) < 250 and time.time() < deadline:  # > 64 KiB of replica log lines
                time.sleep(0.5)
            assert answered.count(200) >= 250, (attempt, answered[-10:])
            seconds, output = _interrupt(proc, SHUTDOWN_BOUND_S)
        finally:
            stop.set()
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, (attempt, round(seconds), output[-8000:])
        print(f"attempt {attempt}: exited {seconds:.1f} s after SIGINT, {answered.count(200)} answers")


def _get_models(url, token):
    return requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["data"]


def test_token_from_environment_wins_over_file(tmp_path, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    assert read_token(str(secret)) == "from-file"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(str(secret)) == "from-env"
    with pytest.raises(OffsideError, match="token_file"):
        load_settings({"models": {"x": str(tmp_path)}, "token_file": str(tmp_path / "nope")})
