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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from offside.config import deep_merge, from_dict
from offside.data.loader import load_benchmark
from offside.data.scenarios import SCENARIOS
from offside.engine.trainer import TrainSpec
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec, check
from offside.eval.sanity import untrained, vanilla_check, warn
from offside.eval.suites import CHEAP_SUITES, RobustnessSpec, check_suites
from offside.eval.summary import rumour_survival
from offside.models.loading import LoraSpec, ModelSpec, build_or_load
from offside.recipes import PUBLISHED_RELEARN, PUBLISHED_UNLEARN
from offside.report import leaderboard
from offside.stages import EvalConfig, UnlearnConfig, check_out, evaluate_model, unlearn
from offside.unlearn import available, get_method


@dataclass
class MatrixConfig:
    data: str = ""
    model: str = ""  # the vanilla model directory
    dtype: str = "fp32"  # model.dtype and model.device of every cell (offside/models/loading.py)
    device: str = "auto"
    out: str = ""
    methods: list[str] = field(default_factory=list)  # empty: every registered method
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    train: TrainSpec = field(default_factory=lambda: replace(PUBLISHED_UNLEARN))
    relearn: TrainSpec = field(default_factory=lambda: replace(PUBLISHED_RELEARN))
    method_args: dict = field(default_factory=dict)  # {method: {hyperparameter: value}}
    method_train: dict = field(default_factory=dict)  # {method: {train key: value}} on top of `train`
    lora: LoraSpec | None = None
    freeze_vision: bool = True
    forget_fraction: float = 1.0
    eval: EvalSpec = field(default_factory=EvalSpec)
    allow_untrained: bool = False  # run even when the vanilla model has not learned the benchmark
    suites: list[str] = field(default_factory=lambda: list(CHEAP_SUITES))  # every cell's (and vanilla's) evaluation
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)
    seeds: int = 1  # each cell runs with train.seed 0..seeds-1 (data order, LoRA init); rows: mean ± 95 % interval

    def model_spec(self, name: str, **settings) -> ModelSpec:
        return ModelSpec(name, dtype=self.dtype, device=self.device, **settings)


@dataclass
class Vanilla:
    check: dict  # offside/eval/sanity.py's verdict
    metrics: dict[str, float]  # its evaluation, the reference of relative scores (rumour survival)


def validate(config: MatrixConfig) -> list[str]:
    """Everything that can be checked before any training: methods, their arguments, scenarios."""
    methods = config.methods or available()
    for section in ("method_args", "method_train"):
        unknown = sorted(set(getattr(config, section)) - set(available()))
        if unknown:
            raise OffsideError(f"{section}: unknown method(s) {unknown} (registered: {', '.join(available())})")
    for method in methods:
        get_method(method, config.method_args.get(method, {}), f"method_args.{method}")
        train_spec(config, method)
    unknown = [s for s in config.scenarios if s not in SCENARIOS]
    if unknown:
        raise OffsideError(f"unknown scenario(s) {unknown} (valid: {', '.join(SCENARIOS)})")
    check(config.eval)
    check_suites(config.suites, config.robustness)
    if config.seeds < 1:
        raise OffsideError(f"seeds must be ≥ 1, got {config.seeds}")
    if not config.model:
        raise OffsideError("matrix: the vanilla model directory is required (--model)")
    return methods


def train_spec(config: MatrixConfig, method: str) -> TrainSpec:
    """The shared training spec with this method's overrides (validated like any config section)."""
    overrides = config.method_train.get(method, {})
    return from_dict(TrainSpec, deep_merge(asdict(config.train), overrides), "matrix config", f"method_train.{method}")


def run_matrix(config: MatrixConfig, progress: bool = True) -> list[dict]:
    methods = validate(config)
    out = check_out(config.out)
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
    print(leaderboard.render(rows))
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
