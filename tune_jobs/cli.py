"""Subcommands of `offside` provided by this package (ray is imported inside the command functions)."""

from __future__ import annotations

import signal
import sys


def add_commands(sub) -> None:
    """Adds this package's subcommands to the `offside` parser."""
    from offside.recipes import TINY_KIT_DRILL

    p = sub.add_parser("tune", help="Ray Tune sweep of DeepSpeed unlearning trials, tracked in MLflow")
    p.add_argument("--config", help="sweep YAML (e.g. tune_jobs/configs/tiny.yaml); not needed with --resume")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, ray://HOST:10001) instead of starting a local Ray")
    p.add_argument("--resume", metavar="PATH", help="continue the interrupted sweep in PATH (<storage>/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. name=s2 or num_samples=8")
    p.add_argument("--require-space", action="store_true",
                   help="refuse to start when the storage has less free space than the checkpoints need (default: warn)")
    p.set_defaults(func=cmd_tune)

    quick = sub.add_parser("quickstart", help="synthetic data → vanilla → GA, GD (a local sweep) → eval → leaderboard")
    quick.add_argument("--out", required=True, metavar="DIR", help="new directory for everything the quickstart writes")
    quick.add_argument("--players", type=int, default=12, help="players in the synthetic benchmark")
    quick.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed")
    quick.add_argument("--seeds", type=int, default=1, help="training seeds: N vanilla models, each unlearned; mean ± 95 %% interval")
    quick.add_argument("--phrasings", type=int, default=3, choices=range(1, 5), help="wordings per training question of the vanilla model")
    quick.add_argument("--kit-drill", type=int, default=TINY_KIT_DRILL, metavar="N",
                       help="kit drill photos per club in the vanilla fine-tune, and its vision tower pre-trained on kits, "
                            "so that it reads kits (0: neither, a from-scratch model that remembers photos)")
    quick.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> None:
    from offside.data.kits import check_kit_drill
    from offside.data.phrasings import check_phrasings
    from offside.errors import OffsideError
    from offside.files import check_out

    check_out(args.out)  # the arguments are checked before torch, DeepSpeed and Ray load
    check_phrasings(args.phrasings)
    check_kit_drill(args.kit_drill)
    if args.seeds < 1 or args.players < 1:
        raise OffsideError(f"--seeds and --players must be ≥ 1, got {args.seeds} and {args.players}")
    from tune_jobs.quickstart import quickstart

    quickstart(args.out, players=args.players, seed=args.seed, seeds=args.seeds, phrasings=args.phrasings,
               kit_drill=args.kit_drill)


def cmd_tune(args) -> None:
    """Exit codes: 0 finished; 1 failed (trials errored, or the driver did); 130 interrupted (Ctrl+C or
    SIGTERM: Tune stops its trials and saves its state); 2 bad input."""
    from offside.cli import _overrides
    from offside.errors import OffsideError

    if not args.config and not args.resume:  # before the heavy imports below
        raise OffsideError("--config is required (or --resume PATH to continue a sweep)")
    from tune_jobs.outcome import advice, error_line, is_transient
    from tune_jobs.spec import load_sweep
    from tune_jobs.sweep import run_sweep

    config = load_sweep(args.config, _overrides(args, {})) if args.config and not args.resume else None
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))  # a stop is an interrupt: state saved
    try:
        result = run_sweep(config, address=args.address, resume=args.resume, require_space=args.require_space)
    except KeyboardInterrupt:
        _say(f"sweep interrupted; continue it with: offside tune --resume {args.resume or _sweep_dir(config)}")
        sys.exit(130)
    except OffsideError:
        raise
    except Exception as err:  # the driver failed (e.g. the disk filled under Tune's own files)
        import traceback

        traceback.print_exc()
        line = error_line(f"{type(err).__name__}: {err}") or type(err).__name__
        resume = f"offside tune --resume {args.resume or _sweep_dir(config)}"
        _say(f"sweep failed: {line}\n  " + (f"{resume} continues it once the cause is gone" if is_transient(line)
                                             else f"{resume} continues it, but this error is likely to recur until its cause is fixed"))
        sys.exit(1)
    if result.interrupted:
        _say(f"sweep interrupted; continue it with: offside tune --resume {result.sweep_dir}")
        sys.exit(130)
    if not result.complete:
        _say(f"sweep failed: {len(result.failed)} trial(s) failed:\n" + "\n".join(f.line() for f in result.failed)
             + "\n  " + advice(result.failed, result.sweep_dir))
        sys.exit(1)
    print((result.sweep_dir / "results.md").read_text())
    best = result.best
    print(f"[offside] best trial {best['trial_id']} (epoch {best['epoch']}): objective {best['objective']:.4f}; "
          f"{result.sweep_dir / 'best.yaml'}", flush=True)


def _sweep_dir(config) -> str:
    from pathlib import Path

    return str(Path(config.storage).resolve() / config.name)


def _say(message: str) -> None:
    print(f"[offside] {message}", flush=True)
