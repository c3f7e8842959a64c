"""Subcommands of `offside` provided by this package (ray is imported inside the command functions)."""

from __future__ import annotations


def add_commands(sub) -> None:
    """Adds this package's subcommands to the `offside` parser."""
    p = sub.add_parser("serve", help="serve models over HTTP on a local Ray (probe, attacks, OpenAI-compatible chat)")
    p.add_argument("--models", nargs="+", metavar="NAME=DIR", help="register models: a saved model or LoRA adapter directory")
    p.add_argument("--config", help="a serve config (serve/config.yaml: its application's args) or a plain args YAML")
    p.add_argument("--data", help="benchmark directory (enables image_id and /v1/attacks)")
    p.add_argument("--token-file", help="file with the API bearer token ($OFFSIDE_API_TOKEN wins)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. max_models_per_replica=8")
    p.set_defaults(func=cmd_serve)


def serve_args(args) -> dict:
    """The app's args: --config < --models/--data/--token-file < --set."""
    from offside.cli import _overrides
    from offside.config import deep_merge, read_yaml
    from offside.errors import OffsideError

    base = read_yaml(args.config) if args.config else {}
    if "applications" in base:
        base = base["applications"][0].get("args", {})
    flags = {}
    for item in args.models or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise OffsideError(f"--models {item!r}: expected NAME=DIR")
        flags.setdefault("models", {})[name] = path
    flags |= {key: value for key, value in (("data", args.data), ("token_file", args.token_file)) if value}
    if "models" in flags:
        base = {k: v for k, v in base.items() if k != "models"}  # --models replaces the config's models
    return deep_merge(deep_merge(base, flags), _overrides(args, {}))


def cmd_serve(args) -> None:
    import faulthandler
    import signal
    import sys
    import time

    from serve.settings import load_settings

    settings = serve_args(args)
    load_settings(settings)  # every setting and model directory is checked before Ray is imported
    from serve.local import logs_dir, start, stop

    # `kill -USR1 PID` prints every thread's stack; to the real stderr, as sys.stderr may be redirected in-process
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)

    try:  # Ctrl-C is a clean stop at any point, also while Serve is still starting
        url = start(settings, args.port, args.host)
        print(f"[offside] serving on {url} (OpenAPI: {url}/docs); logs in {logs_dir()}/serve; Ctrl-C stops", flush=True)
        while True:  # short sleeps: the kernel may hand SIGINT to one of Ray's threads, and Python then
            time.sleep(0.5)  # raises KeyboardInterrupt only when the main thread next runs bytecode
    except KeyboardInterrupt:
        pass
    finally:  # a second SIGINT must not cut the stop short (it is bounded: serve/local.py)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop()
