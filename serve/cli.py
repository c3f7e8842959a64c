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
    import select
    import signal
    import socket
    import sys

    from serve.settings import load_settings

    settings = serve_args(args)
    load_settings(settings)  # every setting and model directory is checked before Ray is imported
    from serve.local import logs_dir, start, stop

    # `kill -USR1 PID` prints every thread's stack; to the real stderr, as sys.stderr may be redirected in-process
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)

    # The kernel may hand SIGINT to one of Ray's threads. Python's handler then only flags it for the main
    # thread, and under load another thread can clear that flag before the main thread looks (CPython
    # 3.11's eval breaker), so the signal is seen late or never. The handler also writes the signal's
    # number to the wakeup fd, from whichever thread it ran on: the main thread waits on that.
    woken, wakeup = socket.socketpair()
    wakeup.setblocking(False)
    signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    try:  # Ctrl-C is a clean stop at any point, also while Serve is still starting
        url = start(settings, args.port, args.host)
        print(f"[offside] serving on {url} (OpenAPI: {url}/docs); logs in {logs_dir()}/serve; Ctrl-C stops", flush=True)
        while not (select.select([woken], [], [], 0.5)[0] and signal.SIGINT in woken.recv(64)):
            pass
    except KeyboardInterrupt:
        pass
    finally:  # a SIGINT flagged but not yet raised must not cut the stop short (it is bounded: serve/local.py)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop()
