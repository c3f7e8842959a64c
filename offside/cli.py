"""The `offside` command. Thin: parses flags into a stage config and calls the stage function.

Every stage takes `--config FILE.yaml` plus flags; flags win over the file, and `--set key.path=value`
reaches any config key. Bad input exits 2 with one line naming the problem."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import yaml

from offside.errors import OffsideError


def _overrides(args: argparse.Namespace, flag_keys: dict[str, str]) -> dict:
    """Turns set flags and `--set a.b=v` into a nested override dict."""
    flat = {key: getattr(args, flag) for flag, key in flag_keys.items() if getattr(args, flag, None) is not None}
    for item in args.set or []:
        if "=" not in item:
            raise OffsideError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        flat[key] = yaml.safe_load(value)
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _config(cls, args, flag_keys: dict[str, str], base: dict | None = None):
    """base (e.g. a recipe) < --config file < flags and --set."""
    from offside.config import deep_merge, from_dict, read_yaml

    data = deep_merge(base or {}, read_yaml(args.config) if args.config else {})
    return from_dict(cls, deep_merge(data, _overrides(args, flag_keys)), args.config or "command line")


FINETUNE_FLAGS = {"data": "data", "out": "out", "model": "model.name", "split": "split", "epochs": "train.epochs", "lr": "train.lr",
                  "seed": "train.seed", "phrasings": "phrasings"}
UNLEARN_FLAGS = {"data": "data", "out": "out", "model": "model.name", "method": "method", "scenario": "scenario",
                 "forget_fraction": "forget_fraction", "epochs": "train.epochs", "lr": "train.lr", "seed": "train.seed"}
RELEARN_FLAGS = {"data": "data", "out": "out", "model": "model.name", "epochs": "train.epochs", "lr": "train.lr", "seed": "train.seed"}
MATRIX_FLAGS = {"data": "data", "out": "out", "model": "model", "methods": "methods", "scenarios": "scenarios",
                "allow_untrained": "allow_untrained", "seeds": "seeds"}
EVAL_FLAGS = {"data": "data", "out": "out", "model": "model.name", "mcq_mode": "eval.mcq_mode", "suite": "suites"}


def cmd_data_synth(args) -> None:
    from offside.data.synth import generate

    print(generate(args.out, players=args.players, seed=args.seed))


def cmd_data_stats(args) -> None:
    from offside.data.loader import load_benchmark
    from offside.data.stats import stats

    result = stats(load_benchmark(args.dir))
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))


def cmd_data_import(args) -> None:
    from offside.data.hub import import_from_hub

    print(import_from_hub(args.hub, args.out, revision=args.revision))


def _print_result(result) -> None:
    print(json.dumps({"run_dir": str(result.run_dir), "mlflow_run_id": result.run_id, "metrics": result.metrics}, indent=2))


def cmd_finetune(args) -> None:
    from offside.recipes import finetune_recipe
    from offside.stages import FinetuneConfig, finetune

    model = _config(FinetuneConfig, args, FINETUNE_FLAGS).model.name  # the recipe depends on the model chosen,
    phrasings = _config(FinetuneConfig, args, FINETUNE_FLAGS, finetune_recipe(model)).phrasings  # and its epochs on the phrasings
    _print_result(finetune(_config(FinetuneConfig, args, FINETUNE_FLAGS, finetune_recipe(model, phrasings))))


def cmd_unlearn(args) -> None:
    from offside.engine.trainer import is_main_rank
    from offside.stages import UnlearnConfig, unlearn

    result = unlearn(_config(UnlearnConfig, args, UNLEARN_FLAGS))
    _print_result(result)
    if args.register and is_main_rank():
        from offside.registry import register_stage

        print(f"registered {register_stage(result.run_dir, args.register)}")


def cmd_relearn(args) -> None:
    from offside.stages import RelearnConfig, relearn

    _print_result(relearn(_config(RelearnConfig, args, RELEARN_FLAGS)))


def cmd_eval(args) -> None:
    from offside.eval.suites import SUITES
    from offside.stages import EvalConfig, evaluate_model

    _print_result(evaluate_model(_config(EvalConfig, args, EVAL_FLAGS, {"suites": list(SUITES)})))


def cmd_report(args) -> None:
    from offside.report.report import ReportConfig, make_report

    make_report(ReportConfig(runs=args.runs, out=args.out, vanilla=args.vanilla or ""))


def cmd_matrix(args) -> None:
    from offside.matrix import MatrixConfig, run_matrix
    from offside.recipes import recipe_config

    run_matrix(_config(MatrixConfig, args, MATRIX_FLAGS, recipe_config(args.recipe) if args.recipe else None))


def cmd_findings(args) -> None:
    from offside.report.findings import findings, load_matrix, render, seeds_of

    matrix = load_matrix(args.matrix)
    attacked = load_matrix(args.attacks) if args.attacks else []
    print(render(findings(matrix, attacked), seeds_of(matrix)))


def cmd_export(args) -> None:
    from offside.stages import export_merged

    print(export_merged(args.model, args.out, args.dtype))


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


SWITCHES = {"allow_untrained": "run even when the vanilla model has not learned the benchmark"}


def _stage_parser(sub, name: str, help_text: str, flags: dict[str, str], func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. train.lr=1e-4")
    types = {"phrasings": int, "epochs": int, "lr": float, "seed": int, "seeds": int, "forget_fraction": float, "methods": _names, "scenarios": _names, "suite": _names}
    for flag in flags:
        name = f"--{flag.replace('_', '-')}"
        if flag in SWITCHES:  # default None, not False: an unset switch must not override the config file
            p.add_argument(name, dest=flag, action="store_true", default=None, help=SWITCHES[flag])
        else:
            p.add_argument(name, dest=flag, type=types.get(flag, str))
    p.set_defaults(func=func)
    return p


# Commands that run on Ray live outside the library (offside/ never imports ray). Each module
# adds its subcommands with `add_commands(sub)` and imports ray only inside the command functions.
COMMAND_PACKAGES = ("tune_jobs.cli", "serve.cli", "cluster.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offside", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, import and inspect benchmark data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate a synthetic benchmark in the published OFFSIDE format")
    synth.add_argument("--out", required=True)
    synth.add_argument("--players", type=int, default=80)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)
    stats = data.add_parser("stats", help="record counts per split × modality × form × kind")
    stats.add_argument("dir")
    stats.add_argument("--json", action="store_true", help="one line of JSON")
    stats.set_defaults(func=cmd_data_stats)
    imp = data.add_parser("import", help="fetch the published dataset from a hub and validate it")
    imp.add_argument("--hub", required=True, metavar="REPO_ID")
    imp.add_argument("--out", required=True)
    imp.add_argument("--revision")
    imp.set_defaults(func=cmd_data_import)

    _stage_parser(sub, "finetune", "fine-tune the vanilla model (learns facts and rumours)", FINETUNE_FLAGS, cmd_finetune)
    unlearn = _stage_parser(sub, "unlearn", "run an unlearning method in a scenario", UNLEARN_FLAGS, cmd_unlearn)
    unlearn.add_argument("--register", metavar="NAME", help="register the unlearned model in the MLflow Model Registry as a new version of NAME")
    _stage_parser(sub, "relearn", "corrective relearning: fine-tune on the true facts, then evaluate", RELEARN_FLAGS, cmd_relearn)
    _stage_parser(sub, "eval", "evaluate a model: --suite efficacy,generalization,visual,utility,robustness (default all)", EVAL_FLAGS, cmd_eval)

    report = sub.add_parser("report", help="leaderboard.md, self-contained report.html and plots from eval runs (logged to MLflow)")
    report.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="eval run directories")
    report.add_argument("--out", required=True)
    report.add_argument("--vanilla", metavar="DIR", help="eval run of the vanilla model (default: found among --runs)")
    report.set_defaults(func=cmd_report)

    matrix = _stage_parser(sub, "matrix", "every method × scenario from one vanilla model → leaderboard", MATRIX_FLAGS, cmd_matrix)
    matrix.add_argument("--recipe", choices=["published", "tiny"], help="training specs and method arguments to start from")

    found = sub.add_parser("findings", help="the paper's five findings from matrix runs, with intervals over seeds")
    found.add_argument("--matrix", required=True, metavar="DIR", help="an `offside matrix` output directory")
    found.add_argument("--attacks", metavar="DIR", help="a matrix evaluated with the prompt attacks (finding 5)")
    found.set_defaults(func=cmd_findings)

    export = sub.add_parser("export", help="merge a LoRA stage's adapter into its base: a plain model directory")
    export.add_argument("--model", required=True, metavar="DIR", help="an adapter directory (or any model directory, or a registry URI models:/NAME@ALIAS)")
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    export.set_defaults(func=cmd_export)

    for module in COMMAND_PACKAGES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OffsideError as err:
        print(f"offside: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
