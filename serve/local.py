"""The probe app on a Ray started in this process (for `offside serve`, tests and benchmarks).

Ray's worker logs stay in the session's log files (`<session_dir>/logs`, Serve's under `logs/serve`)
and are not forwarded to this process: forwarded lines are printed by two driver threads that
`ray.shutdown()` joins, so a reader of stdout that is slow or gone (a pipe nobody drains, a paused
terminal) kept `offside serve` from exiting after Ctrl-C for as long as it did not read."""

from __future__ import annotations

from pathlib import Path

_session: dict[str, Path] = {}  # the Ray session this process started


def start(args: dict, port: int, host: str = "127.0.0.1", num_cpus: int | None = None, quiet: bool = False) -> str:
    """Validates `args` (ServeSettings), starts local Ray and Serve on host:port, deploys the app and
    returns its base URL. Never attaches to another Ray: `address="local"`."""
    import ray
    from ray import serve

    from serve.app import build
    from serve.settings import load_settings

    load_settings(args)  # bad settings fail before anything starts
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                       logging_level="ERROR" if quiet else "INFO")
    _session["logs"] = Path(context.address_info["session_dir"]) / "logs"
    app = build(args)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="offside", route_prefix="/")
    return f"http://{host}:{port}"


def logs_dir() -> Path:
    """Where this process's Ray writes its logs (Serve's access and replica logs under serve/)."""
    return _session["logs"]


GRACE_S = 60  # Serve's own bounds: replicas drain ≤ 20 s, its controller's shutdown call ≤ 30 s
HARD_BOUND_S = 150


def stop() -> None:
    """Serve's graceful shutdown (replicas finish what they hold), then Ray's, which ends every Serve
    actor as this process owns the Ray it started. Each wait is bounded: past GRACE_S the graceful
    part is abandoned; past HARD_BOUND_S in all, every thread's stack goes to stderr and the process
    exits with status 1 (Ray's processes share its fate), so a stop never hangs silently."""
    import faulthandler
    import sys
    import threading

    import ray
    from ray import serve

    faulthandler.dump_traceback_later(HARD_BOUND_S, exit=True, file=sys.__stderr__)
    graceful = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
    graceful.start()
    graceful.join(GRACE_S)
    if graceful.is_alive():
        print(f"[offside] Serve did not shut down within {GRACE_S} s; stopping Ray", file=sys.__stderr__, flush=True)
    ray.shutdown()
    faulthandler.cancel_dump_traceback_later()
