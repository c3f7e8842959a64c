"""Load on the probe endpoint: throughput and p50/p99 latency at concurrency 1, 8 and 32 with dynamic
batching on and off, then a soak of 2,000 requests that must all succeed; and on chat completions,
streamed and not, at concurrency 1 and 16: time to first token (TTFT: the first content delta of a
stream, the whole answer otherwise), inter-token latency (ITL: the mean gap between a stream's
content deltas) and total latency.

The server is the real app on a local Ray (loopback only): a tiny base model and two LoRA adapters,
requests alternating between the adapters (so batches mix adapters). Clients are separate processes
(threads inside them), each level is bounded in requests and in time. Prints a table and one JSON line.

    .venv/bin/python bench/serve_load.py [--requests-per-sender 6] [--soak 2000] [--max-tokens 32] [--chat-only]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from serve.settings import TOKEN_ENV

TOKEN = "bench-token"
LEVELS = (1, 8, 32)
CHAT_LEVELS = (1, 16)
CLIENT_PROCESSES = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str, bodies: list[dict | None], threads: int, deadline: float) -> tuple[list[float], int]:
    """One client process: `threads` concurrent senders share `bodies`; returns (latencies, errors)."""
    import requests

    def send(body_slice: list[dict]) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with requests.Session() as session:
            for body in body_slice:
                if time.time() > deadline:
                    break
                started = time.perf_counter()
                headers = {"Authorization": f"Bearer {TOKEN}"}
                try:  # None: GET /v1/models, a route without model work (the HTTP path's own cost)
                    response = session.get(url + "/v1/models", headers=headers, timeout=60) if body is None \
                        else session.post(url + "/v1/probe", json=body, headers=headers, timeout=60)
                    ok = response.status_code == 200
                except requests.RequestException:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok
        return latencies, errors

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(send, [bodies[i::threads] for i in range(threads)]))
    return [x for lat, _ in results for x in lat], sum(e for _, e in results)


def load(url: str, bodies: list[dict | None], concurrency: int, time_limit_s: float) -> dict:
    """Sends `bodies` with `concurrency` senders spread over client processes."""
    processes = min(CLIENT_PROCESSES, concurrency)
    deadline = time.time() + time_limit_s
    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        shares = [pool.submit(_client, url, bodies[i::processes], concurrency // processes + (i < concurrency % processes), deadline)
                  for i in range(processes)]
        results = [s.result() for s in shares]
    elapsed = time.perf_counter() - started
    latencies = sorted(x for lat, _ in results for x in lat)
    return {
        "requests": len(latencies), "errors": sum(e for _, e in results), "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
    }


def _chat_request(url: str, body: dict) -> dict | None:
    """One chat completion: total latency, TTFT and the gaps between content deltas (streamed), or None."""
    import requests

    headers = {"Authorization": f"Bearer {TOKEN}"}
    started = time.perf_counter()
    try:
        response = requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120, stream=body["stream"])
        if response.status_code != 200:
            return None
        if not body["stream"]:
            tokens = response.json()["usage"]["completion_tokens"]
            total = time.perf_counter() - started
            return {"ttft": total, "gaps": [], "total": total, "tokens": tokens}
        arrivals = []
        for line in response.iter_lines(chunk_size=1, decode_unicode=True):
            if line.startswith("data: {") and '"content": "' in line and '"role"' not in line:
                arrivals.append(time.perf_counter())
        total = time.perf_counter() - started
    except requests.RequestException:
        return None
    if not arrivals:
        return None
    return {"ttft": arrivals[0] - started, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])], "total": total,
            "tokens": len(arrivals)}


def chat_level(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Chat requests from `concurrency` threads: p50 TTFT, mean ITL, p50/p99 total latency, tokens/s."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: _chat_request(url, body), bodies))
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r is not None]
    ttft, total = sorted(r["ttft"] for r in ok), sorted(r["total"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 1) if ok else None,
            "itl_mean_ms": round(1000 * sum(gaps) / len(gaps), 1) if gaps else None,
            "total_p50_ms": round(1000 * total[len(total) // 2], 1) if ok else None,
            "total_p99_ms": round(1000 * total[min(len(total) - 1, int(len(total) * 0.99))], 1) if ok else None,
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 1)}


def chat_workload(data: Path, count: int, max_tokens: int, stream: bool) -> list[dict]:
    """Image questions as chat turns, alternating adapters; sampled (seeded) so answers run to max_tokens."""
    import base64
    import io

    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise

    rows = [r for r in materialise(load_benchmark(data)["forget"]) if r["form"] == "gen" and r["modality"] == "image"]
    bodies = []
    for i in range(count):
        row = rows[i % len(rows)]
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "text", "text": row["question"]}, {"type": "image_url", "image_url": {"url": image}}]
        bodies.append({"model": ("a1", "a2")[i % 2], "messages": [{"role": "user", "content": content}], "stream": stream,
                       "max_tokens": max_tokens, "temperature": 1.0, "seed": i})
    return bodies


def workload(data: Path, count: int, max_tokens: int) -> list[dict]:
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise

    rows = [r for r in materialise(load_benchmark(data)["forget"]) if r["form"] == "gen" and r["modality"] == "image"]
    return [{"model": ("a1", "a2")[i % 2], "question": rows[i % len(rows)]["question"],
             "image_id": rows[i % len(rows)]["image_id"], "max_tokens": max_tokens} for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-sender", type=int, default=6, help="requests per concurrent sender at each level")
    parser.add_argument("--min-requests", type=int, default=40)
    parser.add_argument("--soak", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32, help="generation length (32: what `offside eval` generates)")
    parser.add_argument("--level-time-limit", type=float, default=90.0)
    parser.add_argument("--soak-time-limit", type=float, default=600.0)
    parser.add_argument("--chat-requests", type=int, default=48, help="chat requests per level (streamed or not)")
    parser.add_argument("--chat-only", action="store_true", help="only the chat (TTFT / ITL) levels")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[TOKEN_ENV] = TOKEN  # before Ray starts: the replicas inherit it
    from ray import serve

    from serve.app import build
    from serve.demo import tiny_models
    from serve.local import start, stop

    root = Path(tempfile.mkdtemp(prefix="serve-load-"))
    data, _, (a1, a2) = tiny_models(root)
    settings = {"models": {"a1": str(a1), "a2": str(a2)}, "data": str(data), "max_batch_size": 32}
    url = start(settings | {"batching": True}, _free_port(), num_cpus=2, quiet=True)
    table, figures, chat = [], {}, {}
    try:
        for concurrency in CHAT_LEVELS:
            for stream in (True, False):
                count = max(concurrency * 3, args.chat_requests if concurrency > 1 else args.chat_requests // 4)
                chat_level(url, chat_workload(data, 2, args.max_tokens, stream), 2)  # warm
                chat[f"c{concurrency}_{'stream' if stream else 'whole'}"] = chat_level(
                    url, chat_workload(data, count, args.max_tokens, stream), concurrency)
        if not args.chat_only:
            http_only = load(url, [None] * 32 * args.requests_per_sender, 32, args.level_time_limit)
            for batching in (True, False):
                serve.run(build(settings | {"batching": batching}), name="offside", route_prefix="/")
                stats = serve.get_deployment_handle("Probe", app_name="offside").stats
                load(url, workload(data, 8, args.max_tokens), 8, 60)  # warm: models loaded, code paths compiled
                for concurrency in LEVELS:
                    count = max(args.min_requests, concurrency * args.requests_per_sender)
                    stats.remote(reset=True).result()
                    result = load(url, workload(data, count, args.max_tokens), concurrency, args.level_time_limit)
                    result["mean_batch"] = round(stats.remote(reset=True).result()["mean_batch_size"], 1)
                    mode = "on" if batching else "off"
                    table.append((mode, concurrency, result))
                    figures[f"c{concurrency}_batching_{mode}"] = result
            serve.run(build(settings | {"batching": True}), name="offside", route_prefix="/")
            soak = load(url, workload(data, args.soak, args.max_tokens), 32, args.soak_time_limit)
    finally:
        stop()
    print(f"chat completions, {args.max_tokens} tokens sampled, adapters mixed (TTFT of a whole answer = its latency)")
    print(f"{'mode':>6} {'conc':>5} {'requests':>9} {'errors':>7} {'TTFT p50':>9} {'ITL mean':>9} {'total p50':>10} {'total p99':>10} {'tok/s':>7}")
    for key, r in chat.items():
        concurrency, mode = key.split("_")
        print(f"{mode:>6} {concurrency[1:]:>5} {r['requests']:>9} {r['errors']:>7} {r['ttft_p50_ms']!s:>9} {r['itl_mean_ms']!s:>9} "
              f"{r['total_p50_ms']!s:>10} {r['total_p99_ms']!s:>10} {r['tokens_per_s']:>7}")
    if args.chat_only:
        print(json.dumps({"chat": chat}))
        return
    speedup = figures["c32_batching_on"]["rps"] / figures["c32_batching_off"]["rps"]
    print(f"{'batching':>8} {'conc':>5} {'requests':>9} {'errors':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    rows = table + [("soak", 32, soak), ("GET-only", 32, http_only)]
    for mode, concurrency, r in rows:
        print(f"{mode:>8} {concurrency:>5} {r['requests']:>9} {r['errors']:>7} {r['rps']:>8} {r['p50_ms']:>8} "
              f"{r['p99_ms']:>8} {r.get('mean_batch', '-'):>6}")
    print("GET-only: GET /v1/models through the same proxy and ingress, no model work — the HTTP path's ceiling")
    print(f"batching speedup at concurrency 32: {speedup:.2f}× (target ≥ 3×); soak errors: {soak['errors']}")
    print(json.dumps({"chat": chat, "levels": figures, "soak": soak, "http_only_c32": http_only, "speedup_c32": round(speedup, 2),
                      "target_met": speedup >= 3 and soak["errors"] == 0 and soak["requests"] == args.soak}))


if __name__ == "__main__":
    main()
