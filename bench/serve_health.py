"""/healthz latency while the probe replica computes heavy batches, against its latency when idle.

/healthz pings the probe replica, so it answers only when the replica's event loop is free: with the
model work on the replica's compute thread it stays fast while a batch computes; with the work on the
event loop it would wait for the batch to end. The server is the real app on a local Ray (loopback
only) with a tiny random model, which never stops early: every answer runs to `--max-tokens`. Bounded
in requests (`--waves` × `--concurrency`) and in time. Prints a table and one JSON line.

    .venv/bin/python bench/serve_health.py [--waves 3] [--concurrency 16] [--max-tokens 96] [--images 2]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from serve.settings import TOKEN_ENV

TOKEN = "bench-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies) or [float("nan")]
    pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)  # noqa: E731
    return {"polls": len(latencies), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(1000 * ordered[-1], 1)}


def poll_health(url: str, stop: threading.Event, interval_s: float, limit: int) -> list[float]:
    """/healthz latencies until `stop` is set (or `limit` polls); a non-200 answer counts as its latency too."""
    latencies = []
    with requests.Session() as session:
        while not stop.is_set() and len(latencies) < limit:
            started = time.perf_counter()
            session.get(url + "/healthz", timeout=60)
            latencies.append(time.perf_counter() - started)
            time.sleep(interval_s)
    return latencies


def heavy_body(images: list[str], max_tokens: int, seed: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content.append({"type": "text", "text": "Describe the player in these images, club by club. " * 20})
    return {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": seed}


def busy(url: str, bodies: list[dict], concurrency: int, deadline: float) -> tuple[int, int, list[float]]:
    """Sends the bodies `concurrency` at a time; returns (answered, errors, per-request seconds)."""
    def send(body: dict) -> tuple[bool, float]:
        if time.time() > deadline:
            return False, 0.0
        started = time.perf_counter()
        try:
            ok = requests.post(url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=300).status_code == 200
        except requests.RequestException:
            ok = False
        return ok, time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, bodies))
    return sum(ok for ok, _ in results), sum(not ok for ok, _ in results), [s for ok, s in results if ok]


def measure_during(url: str, work, interval_s: float) -> tuple[list[float], object]:
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        polls = pool.submit(poll_health, url, stop, interval_s, 100_000)
        try:
            result = work()
        finally:
            stop.set()
        return polls.result(), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=3, help="waves of concurrent heavy requests")
    parser.add_argument("--concurrency", type=int, default=16, help="requests per wave (one batch when ≤ max_batch_size)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--images", type=int, default=2, help="images per request (prefill work)")
    parser.add_argument("--idle-polls", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between health polls")
    parser.add_argument("--time-limit", type=float, default=300.0)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[TOKEN_ENV] = TOKEN  # before Ray starts: the replicas inherit it
    from PIL import Image
    from ray import serve

    from serve.demo import tiny_models
    from serve.local import start, stop

    root = Path(tempfile.mkdtemp(prefix="serve-health-"))
    _, base, _ = tiny_models(root, adapters=0)
    url = start({"models": {"base": str(base)}, "max_batch_size": 32}, _free_port(), num_cpus=2, quiet=True)
    try:
        images = []
        for i in range(args.images):
            buf = io.BytesIO()
            Image.new("RGB", (56, 56), (40 * i, 120, 200)).save(buf, format="PNG")
            images.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        warm = heavy_body(images, 2, 0)
        assert requests.post(url + "/v1/chat/completions", json=warm, headers=HEADERS, timeout=300).status_code == 200
        stats = serve.get_deployment_handle("Probe", app_name="offside").stats
        idle = poll_health(url, threading.Event(), args.interval, args.idle_polls)
        deadline = time.time() + args.time_limit
        stats.remote(reset=True).result()
        bodies = [heavy_body(images, args.max_tokens, seed) for seed in range(args.waves * args.concurrency)]
        started = time.perf_counter()
        during, (answered, errors, seconds) = measure_during(
            url, lambda: busy(url, bodies, args.concurrency, deadline), args.interval)
        elapsed = time.perf_counter() - started
        batches = stats.remote(reset=True).result()
    finally:
        stop()
    figures = {"idle": _percentiles(idle), "during_batch": _percentiles(during)}
    print(f"{'phase':>13} {'polls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase, r in figures.items():
        print(f"{phase:>13} {r['polls']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8}")
    mean_request = sum(seconds) / max(1, len(seconds))
    print(f"heavy requests: {answered} answered, {errors} errors in {elapsed:.1f} s (mean {mean_request:.2f} s each); "
          f"{batches['batches']} batches, mean size {batches['mean_batch_size']:.1f}, {args.max_tokens} tokens per answer")
    print(json.dumps({
        "health_p50_ms_idle": figures["idle"]["p50_ms"], "health_p99_ms_idle": figures["idle"]["p99_ms"],
        "health_p50_ms_during_batch": figures["during_batch"]["p50_ms"],
        "health_p99_ms_during_batch": figures["during_batch"]["p99_ms"],
        "health_max_ms_during_batch": figures["during_batch"]["max_ms"], "health_polls_during_batch": len(during),
        "heavy_requests": answered, "heavy_errors": errors, "heavy_seconds": round(elapsed, 2),
        "mean_request_s": round(mean_request, 2), "batches": batches["batches"],
        "mean_batch_size": round(batches["mean_batch_size"], 1),
    }))


if __name__ == "__main__":
    main()
