"""`offside matrix`: every method × scenario from one vanilla model, each unlearned with its defaults,
evaluated, and written to DIR/leaderboard.md + DIR/results.json as rows finish (the vanilla model's own
evaluation is the first row, and the reference of each cell's rumour survival). A failed row is
reported with its error, never dropped. Relearning rows also carry the metrics of the unlearned model
before relearning (`unlearned_metrics`), so resurfacing rumours show as numbers.

Before any cell the vanilla model is checked (offside/eval/sanity.py, written to DIR/vanilla_check.json
and every cell's manifest): a model that has not learned the benchmark is refused unless
`allow_untrained`."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from offside.config import deep_merge, from_dict
from offside.configs import MatrixConfig  # noqa: F401  (re-exported)
from offside.configs import validate as validate_config
from offside.data.loader import load_benchmark
from offside.engine.trainer import TrainSpec
from offside.errors import OffsideError
from offside.eval.sanity import untrained, vanilla_check, warn
from offside.eval.suites import check_suites
from offside.eval.summary import rumour_survival
from offside.models.loading import build_or_load
from offside.report import leaderboard
from offside.stages import EvalConfig, UnlearnConfig, evaluate_model, unlearn
from offside.unlearn import available, get_method


@dataclass
class Vanilla:
    check: dict  # offside/eval/sanity.py's verdict
    metrics: dict[str, float]  # its evaluation, the reference of relative scores (rumour survival)


def validate(config: MatrixConfig) -> list[str]:
    """Everything that can be checked before any training: methods, their arguments, scenarios."""
    validate_config(config)
    methods = config.methods or available()
    for section in ("method_args", "method_train"):
        unknown = sorted(set(getattr(config, section)) - set(available()))
        if unknown:
            raise OffsideError(f"{section}: unknown method(s) {unknown} (registered: {', '.join(available())})")
    for method in methods:
        get_method(method, config.method_args.get(method, {}), f"method_args.{method}")
        train_spec(config, method)
    check_suites(config.suites, config.robustness)  # attack names, against the registry
    return methods


def train_spec(config: MatrixConfig, method: str) -> TrainSpec:
    """The shared training spec with this method's overrides (validated like any config section)."""
    overrides = config.method_train.get(method, {})
    return from_dict(TrainSpec, deep_merge(asdict(config.train), overrides), "matrix config", f"method_train.{method}")


def run_matrix(config: MatrixConfig, progress: bool = True) -> list[dict]:
    """Runs every method × scenario of `config` from its vanilla model (after checking the vanilla model
    has learned the benchmark), evaluates each, and rewrites DIR/leaderboard.md and DIR/results.json as
    rows finish; returns the rows (the first is the vanilla model's own evaluation)."""
    methods = validate(config)
    out = Path(config.out)
    checked = check_vanilla(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vanilla_check.json").write_text(json.dumps(checked, indent=2) + "\n")
    evaluated = _evaluate(config, Path(config.model), out / "eval-vanilla", progress)
    vanilla = Vanilla(checked, evaluated.metrics)
    rows = [leaderboard.with_runs({"name": "vanilla", "method": "none", "scenario": "none", "seeds": 1}, [{
        "run_dir": str(Path(config.model).resolve()), "eval_dir": str(evaluated.run_dir),
        "mlflow_run_id": evaluated.run_id, "metrics": _with_survival(evaluated.metrics, vanilla)}])]
    for method in methods:
        for scenario in config.scenarios:
            started = time.time()
            row = _run_cell(config, out, method, scenario, vanilla, progress)
            row["wall_time_s"] = round(time.time() - started, 1)
            rows.append(row)
            leaderboard.write(rows, out)
            status = f"failed: {row['error']}" if "error" in row else "done"
            print(f"[offside] matrix {method} × {scenario}: {status} ({row['wall_time_s']}s)", flush=True)
    print(leaderboard.render_compact(rows, f"{out / 'results.json'}, {out / 'leaderboard.md'}"))
    return rows


def check_vanilla(config: MatrixConfig) -> dict:
    """The vanilla check; an untrained model is an error unless allow_untrained (then a warning)."""
    model, processor = build_or_load(config.model_spec(config.model))
    result = vanilla_check(model, processor, load_benchmark(config.data))
    message = untrained(result, config.model)
    if message and not config.allow_untrained:
        raise OffsideError(f"matrix: {message}. Train it further, or pass --allow-untrained (allow_untrained: true) "
                           "to run the matrix anyway")
    warn(message)
    return result


def _run_cell(config: MatrixConfig, out: Path, method: str, scenario: str, vanilla: Vanilla, progress: bool) -> dict:
    """One method × scenario: a run per seed; the row's metrics are their mean, with 95 % intervals
    (over seeds, or for one seed a bootstrap over items; offside/report/intervals.py)."""
    row: dict = {"name": f"{method}-{scenario}", "method": method, "scenario": scenario, "seeds": config.seeds}
    try:
        runs = [_run_seed(config, out, method, scenario, vanilla, progress, seed) for seed in range(config.seeds)]
    except Exception as err:  # a failed cell is a row of the table, not the end of the matrix
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=5)
        return row
    return leaderboard.with_runs(row, runs)


def _run_seed(config: MatrixConfig, out: Path, method: str, scenario: str, vanilla: Vanilla, progress: bool, seed: int) -> dict:
    name = f"{method}-{scenario}" + (f"-seed{seed}" if config.seeds > 1 else "")
    result = unlearn(UnlearnConfig(
        data=config.data, out=str(out / name), method=method, scenario=scenario,
        method_args=config.method_args.get(method, {}), forget_fraction=config.forget_fraction,
        model=config.model_spec(config.model, lora=config.lora, freeze_vision=config.freeze_vision),
        train=replace(train_spec(config, method), seed=seed), relearn=config.relearn,
    ), progress, vanilla_check=vanilla.check)
    evaluated = _evaluate(config, result.run_dir, out / f"eval-{name}", progress)
    run = {"seed": seed, "run_dir": str(result.run_dir), "eval_dir": str(evaluated.run_dir),
           "mlflow_run_id": evaluated.run_id, "metrics": _with_survival(evaluated.metrics, vanilla)}
    if scenario == "relearning":
        unlearned = _evaluate(config, result.run_dir / "unlearned", out / f"eval-{name}-unlearned", progress).metrics
        run["unlearned_metrics"] = _with_survival(unlearned, vanilla)
    return run


def _with_survival(metrics: dict[str, float], vanilla: Vanilla) -> dict[str, float]:
    return {**metrics, **rumour_survival(metrics, vanilla.metrics)}


def _evaluate(config: MatrixConfig, model_dir: Path, out: Path, progress: bool):
    return evaluate_model(EvalConfig(data=config.data, out=str(out), model=config.model_spec(str(model_dir)), eval=config.eval,
                                     suites=config.suites, robustness=config.robustness), progress)
