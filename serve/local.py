"""The probe app on a Ray started in this process (for `offside serve`, tests and benchmarks)."""

from __future__ import annotations


def start(args: dict, port: int, host: str = "127.0.0.1", num_cpus: int | None = None, quiet: bool = False) -> str:
    """Validates `args` (ServeSettings), starts local Ray and Serve on host:port, deploys the app and
    returns its base URL. Never attaches to another Ray: `address="local"`."""
    import ray
    from ray import serve

    from serve.app import build
    from serve.settings import load_settings

    load_settings(args)  # bad settings fail before anything starts
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
             logging_level="ERROR" if quiet else "INFO")
    app = build(args)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="offside", route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
