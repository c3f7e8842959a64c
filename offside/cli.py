"""The `offside` command: one subcommand per stage, plus sweeps, serving and cluster jobs.

Flags become a stage config (offside/configs.py) that is checked — keys, types, choices, paths —
before torch, DeepSpeed or Ray is imported, so a mistake is reported at once, in one line. Exit
status: 0 done; 1 an unexpected failure (with its traceback); 2 bad input (one line naming it);
130 interrupted; 141 the output pipe was closed (`offside data stats DIR | head`)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from offside import __version__
from offside.errors import OffsideError

DESCRIPTION = ("OFFSIDE: benchmark unlearning of misinformation in multimodal LLMs (arXiv 2510.22535). A vision-language "
               "model learns football-transfer facts and rumours (the vanilla model); an unlearning method erases the "
               "rumours; the benchmark measures what was forgotten, what broke, and what comes back under attack.")
EPILOG = ("Stages take --config FILE.yaml and flags (flags win); --set key.path=value reaches any config key. "
          "Start with `offside quickstart --out runs/quickstart`. Documentation: README.md and docs/.")


@dataclass(frozen=True)
class Flag:
    """A stage flag: the config key it sets, its help, and its type or closed set of choices."""

    key: str
    help: str
    type: type | None = None
    choices: tuple | None = None
    metavar: str | None = None
    switch: bool = False  # a flag without a value, e.g. --allow-untrained


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _flags() -> dict[str, dict[str, Flag]]:
    """Every stage's flags; choices come from the light config modules (no torch)."""
    from offside.configs import FINETUNE_SPLITS, method_names
    from offside.data.phrasings import MAX_PHRASINGS
    from offside.data.schema import SCENARIOS
    from offside.eval.spec import MCQ_MODES, SUITES
    from offside.models.spec import DTYPE_CHOICES
    from offside.recipes import TINY_KIT_DRILL

    data = Flag("data", "benchmark directory (`offside data synth`, or the published files)", metavar="DIR")
    out = Flag("out", "new directory for this stage's outputs (refused if it exists and is not empty)", metavar="DIR")
    model = Flag("model.name", "`tiny`, a model or LoRA adapter directory, a hub id, or models:/NAME@ALIAS", metavar="MODEL")
    trained = Flag("model.name", "the model to start from: a model or adapter directory, or models:/NAME@ALIAS", metavar="MODEL")
    dtype = Flag("model.dtype", "precision of the weights; auto: the checkpoint's own (bf16 for a published "
                 "Qwen2.5-VL, fp32 for the tiny model)", choices=DTYPE_CHOICES)
    device = Flag("model.device", "auto (this process's GPU if there is one, else the CPU), cpu, cuda or cuda:N", metavar="DEVICE")
    train = {"epochs": Flag("train.epochs", "training epochs", int), "lr": Flag("train.lr", "learning rate", float),
             "seed": Flag("train.seed", "training seed (data order, LoRA initialisation)", int)}
    return {
        "finetune": {"data": data, "out": out, "model": model, "dtype": dtype, "device": device,
                     "split": Flag("split", "training data: retain+forget is the vanilla model (learns facts and rumours); "
                                   "retain a retain-only reference model", choices=tuple(FINETUNE_SPLITS)),
                     **train,
                     "phrasings": Flag("phrasings", "wordings per training question (the canonical one + others)", int,
                                       choices=tuple(range(1, MAX_PHRASINGS + 1))),
                     "photos": Flag("photos", "photos of each retain context: the published one + new ones drawn in the "
                                    "same kit, shown with the other wordings (synthetic benchmarks; needs phrasings ≥ 2)", int),
                     "kit_drill": Flag("kit_drill", "photos per club of anonymous players in its kit, asked the club question, "
                                       "and for the tiny model a vision tower pre-trained on kits, so that it reads kits "
                                       f"(synthetic benchmarks; the tiny recipe's: {TINY_KIT_DRILL}; 0: neither)", int)},
        "unlearn": {"data": data, "out": out, "model": trained, "dtype": dtype, "device": device,
                    "method": Flag("method", "unlearning method (offside/unlearn/)", choices=tuple(method_names())),
                    "scenario": Flag("scenario", "what is forgotten: complete (all 14 questions of each forget image), selective "
                                     "(its 6 transfer questions), unimodal (text-only twins), relearning (then fine-tune on "
                                     "the true facts)", choices=SCENARIOS),
                    "forget_fraction": Flag("forget_fraction", "unlearn the forget data of this share of the players", float),
                    **train},
        "relearn": {"data": data, "out": out, "model": trained, "dtype": dtype, "device": device, **train},
        "eval": {"data": data, "out": out, "model": trained, "dtype": dtype, "device": device,
                 "suite": Flag("suites", f"comma-separated suites, of: {', '.join(SUITES)}", _names, metavar="SUITES"),
                 "mcq_mode": Flag("eval.mcq_mode", "multiple choice by option log-likelihood, or the published "
                                  "generate-and-parse protocol", choices=MCQ_MODES)},
        "matrix": {"data": data, "out": out,
                   "model": Flag("model", "the vanilla model directory", metavar="DIR"),
                   "dtype": Flag("dtype", "precision of every cell's weights", choices=DTYPE_CHOICES),
                   "device": Flag("device", "auto, cpu, cuda or cuda:N", metavar="DEVICE"),
                   "methods": Flag("methods", f"comma-separated methods, of: {', '.join(method_names())}", _names, metavar="METHODS"),
                   "scenarios": Flag("scenarios", f"comma-separated scenarios, of: {', '.join(SCENARIOS)}", _names,
                                     metavar="SCENARIOS"),
                   "seeds": Flag("seeds", "training seeds per cell (mean ± 95 % interval over them)", int),
                   "allow_untrained": Flag("allow_untrained", "run even when the vanilla model has not learned the "
                                           "benchmark (otherwise refused before any cell)", switch=True)},
    }


def _config_class(stage: str):
    from offside import configs

    return {"finetune": configs.FinetuneConfig, "unlearn": configs.UnlearnConfig, "relearn": configs.RelearnConfig,
            "eval": configs.EvalConfig, "matrix": configs.MatrixConfig}[stage]


def _default_text(stage: str, key: str) -> str:
    """The value a config key takes when neither the flag nor the config file sets it."""
    from offside.configs import resolved
    from offside.models.spec import ModelSpec

    cls = _config_class(stage)
    if stage == "finetune" and (key.startswith("train.") or key == "phrasings"):
        tiny, other = (_value(resolved(cls(model=ModelSpec(name))), key) for name in ("tiny", "x"))
        return f"{tiny}" if tiny == other else f"{tiny} for tiny (its recipe), {other} for other models"
    value = _value(cls(), key)
    if isinstance(value, list):
        return ",".join(value) or "all"
    return "required, here or in --config" if value == "" else "none" if value is None else str(value)


def _value(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _overrides(args: argparse.Namespace, flags: dict[str, Flag]) -> dict:
    """The flags that were given and `--set a.b=v` as a nested override dict."""
    flat = {flag.key: getattr(args, name) for name, flag in flags.items() if getattr(args, name, None) is not None}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OffsideError(f"--set {item!r}: expected key.path=value")
        flat[key] = yaml.safe_load(value)
    return nest(flat)


def nest(flat: dict) -> dict:
    """{"train.lr": 1e-3} → {"train": {"lr": 1e-3}}."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OffsideError(f"--set {key}: {part} is set to a value and cannot have keys")
        node[leaf] = value
    return nested


def stage_config(stage: str, args: argparse.Namespace):
    """The stage's config from --config, flags and --set (and a matrix's --recipe), checked without
    importing torch, DeepSpeed or Ray."""
    from offside.configs import build, validate
    from offside.recipes import recipe_config

    base = recipe_config(args.recipe) if getattr(args, "recipe", None) else None
    config = build(_config_class(stage), args.config, _overrides(args, _flags()[stage]), base)
    validate(config)
    return config


def cmd_stage(args: argparse.Namespace) -> None:
    config = stage_config(args.command, args)
    if args.command == "matrix":
        from offside.matrix import run_matrix

        run_matrix(config)
        _say(f"matrix done: {Path(config.out) / 'leaderboard.md'} and results.json (every column); "
             f"`offside report --runs {config.out}/eval-*` draws the plots")
        return
    import offside.stages as stages

    run = {"finetune": stages.finetune, "unlearn": stages.unlearn, "relearn": stages.relearn, "eval": stages.evaluate_model}
    result = run[args.command](config)
    from offside.engine.trainer import is_main_rank

    if not is_main_rank():  # under a launcher every rank returns rank 0's result; rank 0 reports it
        return
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "mlflow_run_id": result.run_id, "metrics": result.metrics}, indent=2))
    else:
        print(summary(args.command, result), flush=True)
    if args.command == "unlearn" and args.register:
        from offside.registry import register_stage

        _say(f"registered {register_stage(result.run_dir, args.register)}")


HEADLINES = (("forget img acc", "forget/image/all/mcq_acc"), ("retain img acc", "retain/image/all/mcq_acc"),
             ("test img acc", "test/image/all/mcq_acc"), ("relearn img acc", "relearn/image/all/mcq_acc"),
             ("rumour recovery, plain query", "robust/attack/none/recovery"), ("train loss", "final/train/loss"))


def summary(stage: str, result) -> str:
    """A stage's last words: where its files are, a few headline numbers, and its MLflow run."""
    from offside.tracking import tracking_uri

    run_dir = Path(result.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    lines = [f"[offside] {stage} done in {manifest.get('wall_time_s', 0):.0f}s: {run_dir}"]
    numbers = [f"{label} {result.metrics[key]:.3f}" for label, key in HEADLINES if key in result.metrics]
    if numbers:
        lines.append("  " + " · ".join(numbers))
    check = manifest.get("vanilla_check")
    if check and stage == "finetune":
        verdict = "learned the benchmark" if check.get("learned") else "NOT learned the benchmark"
        lines.append(f"  vanilla check: {verdict} (multiple choice: forget {check['forget']['mcq_acc']:.3f}, "
                     f"retain {check['retain']['mcq_acc']:.3f})")
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
    lines.append(f"  files: {', '.join(files)} (metrics.json: all {len(result.metrics)} metrics)")
    uri = tracking_uri(run_dir.parent)
    lines.append(f"  MLflow run {result.run_id} in {uri}" + (f"; browse: mlflow ui --backend-store-uri {uri}"
                                                          if uri.startswith("sqlite:") else ""))
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"[offside] {message}", flush=True)


def cmd_data_synth(args) -> None:
    from offside.data.synth import generate

    _say(f"benchmark: {generate(args.out, players=args.players, seed=args.seed)} ({args.players} players, seed {args.seed})")


def cmd_data_stats(args) -> None:
    from offside.configs import check_data_dir
    from offside.data.loader import load_benchmark
    from offside.data.stats import stats

    check_data_dir(args.dir)
    result = stats(load_benchmark(args.dir))
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))


def cmd_data_import(args) -> None:
    from offside.data.hub import import_from_hub

    _say(f"benchmark: {import_from_hub(args.hub, args.out, revision=args.revision)}")


def cmd_report(args) -> None:
    from offside.configs import ReportConfig, validate_report

    config = ReportConfig(runs=args.runs, out=args.out, vanilla=args.vanilla or "")
    validate_report(config)
    from offside.report.report import make_report

    out = make_report(config)
    _say(f"report: open {out / 'report.html'} in a browser (leaderboard.md, summary.json and the plots beside it)")


def cmd_findings(args) -> None:
    from offside.report.findings import findings, load_matrix, render, seeds_of

    matrix = load_matrix(args.matrix)
    attacked = load_matrix(args.attacks) if args.attacks else []
    print(render(findings(matrix, attacked), seeds_of(matrix)))


def cmd_export(args) -> None:
    from offside.files import check_out
    from offside.models.spec import check_model_name

    check_model_name(args.model)
    check_out(args.out)
    from offside.stages import export_merged

    _say(f"merged model: {export_merged(args.model, args.out, args.dtype)}")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default where it has one (stage flags state their config default in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class OffsideParser(argparse.ArgumentParser):
    """argparse with the project's help layout and one-line usage errors (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _stage_parser(sub, name: str, help_text: str, func=cmd_stage) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    for flag, spec in _flags()[name].items():
        default = _default_text(name, spec.key)
        default = default if default.startswith("required") else f"default: {default}"
        text = f"{spec.help} ({default}; config key {spec.key})".replace("%", "%%")
        if spec.switch:  # default None, not False: an unset switch must not override the config file
            p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action="store_true", default=None, help=text)
        else:
            p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=spec.type, choices=spec.choices,
                           metavar=spec.metavar, help=text)
    p.add_argument("--config", metavar="FILE", help="YAML config of this stage (flags and --set override it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. train.lr=1e-4 or model.lora={r: 8}; repeatable")
    p.set_defaults(func=func)
    return p


def _with_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the run directory, MLflow run id and every metric as JSON instead of a summary")


# Commands that run on Ray live outside the library (offside/ never imports ray). Each module
# adds its subcommands with `add_commands(sub)` and imports ray only inside the command functions.
COMMAND_PACKAGES = ("tune_jobs.cli", "serve.cli", "cluster.cli")


def build_parser() -> argparse.ArgumentParser:
    from offside.models.spec import WEIGHT_DTYPES

    parser = OffsideParser(prog="offside", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"offside {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OffsideParser)

    data = sub.add_parser("data", help="build, import and inspect benchmark data").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    synth = data.add_parser("synth", help="generate a synthetic benchmark in the published OFFSIDE file format")
    synth.add_argument("--out", required=True, metavar="DIR", help="new benchmark directory")
    synth.add_argument("--players", type=int, default=80, help="fictitious players (8 images, 14 questions per image each)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed: the same seed gives the same files")
    synth.set_defaults(func=cmd_data_synth)
    stats = data.add_parser("stats", help="record counts per split × modality × form × kind")
    stats.add_argument("dir", metavar="DIR", help="a benchmark directory")
    stats.add_argument("--json", action="store_true", help="one line of JSON")
    stats.set_defaults(func=cmd_data_stats)
    imp = data.add_parser("import", help="download the published dataset from the Hugging Face Hub and validate it")
    imp.add_argument("--hub", required=True, metavar="REPO_ID", help="a dataset repository id on the Hub")
    imp.add_argument("--out", required=True, metavar="DIR", help="new directory for the data")
    imp.add_argument("--revision", help="branch, tag or commit of the dataset repository (default: its main branch)")
    imp.set_defaults(func=cmd_data_import)

    _with_json(_stage_parser(sub, "finetune", "fine-tune the vanilla model: it learns the facts and the rumours"))
    unlearn = _stage_parser(sub, "unlearn", "run an unlearning method in a scenario")
    _with_json(unlearn)
    unlearn.add_argument("--register", metavar="NAME",
                         help="register the unlearned model in the MLflow Model Registry as a new version of NAME")
    _with_json(_stage_parser(sub, "relearn", "corrective relearning: fine-tune on the true facts, then evaluate"))
    _with_json(_stage_parser(sub, "eval", "evaluate a model with the suites efficacy, generalization, visual, utility, robustness"))

    report = sub.add_parser("report", help="leaderboard.md, a self-contained report.html and plots from eval runs (logged to MLflow)")
    report.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="eval run directories")
    report.add_argument("--out", required=True, metavar="DIR", help="new directory for the report")
    report.add_argument("--vanilla", metavar="DIR", help="eval run of the vanilla model (default: found among --runs)")
    report.set_defaults(func=cmd_report)

    matrix = _stage_parser(sub, "matrix", "every method × scenario from one vanilla model → leaderboard")
    matrix.add_argument("--recipe", choices=["published", "tiny"],
                        help="training specs and method arguments to start from (default: the published ones; offside/recipes.py)")

    found = sub.add_parser("findings", help="the paper's five findings from matrix runs, with intervals over seeds")
    found.add_argument("--matrix", required=True, metavar="DIR", help="an `offside matrix` output directory")
    found.add_argument("--attacks", metavar="DIR", help="a matrix evaluated with the prompt attacks (finding 5)")
    found.set_defaults(func=cmd_findings)

    export = sub.add_parser("export", help="merge a LoRA stage's adapter into its base: a plain model directory")
    export.add_argument("--model", required=True, metavar="MODEL",
                        help="an adapter directory (or any model directory, or a registry URI models:/NAME@ALIAS)")
    export.add_argument("--out", required=True, metavar="DIR", help="new directory for the merged model")
    export.add_argument("--dtype", default="fp32", choices=WEIGHT_DTYPES, help="precision of the merged weights")
    export.set_defaults(func=cmd_export)

    for module in COMMAND_PACKAGES:
        importlib.import_module(module).add_commands(sub)
    _add_verbose(parser, False)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, default) -> None:
    """--verbose on every (sub)command: the top level's default is False, a subcommand's leaves it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show the libraries' log lines (Ray, DeepSpeed, MLflow, transformers), hidden by default")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child, argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already printed)
        return done.code if isinstance(done.code, int) else 0
    from offside import logs

    logs.configure(args.verbose)
    try:
        args.func(args)
    except OffsideError as err:
        print(f"offside: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("offside: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
