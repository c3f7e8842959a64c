"""The sweep config (`offside tune --config FILE`): a typed dataclass validated on load, and every check
that can fail a sweep before any trial starts (unknown method or scenario, empty or malformed search
space, an objective naming a metric no suite produces). Resource checks need the cluster and live in
`tune_jobs.sweep`. Nothing here imports ray."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from offside.config import from_dict, load_yaml
from offside.data.scenarios import SCENARIOS
from offside.data.schema import KINDS, RUMOUR_KINDS
from offside.engine.trainer import TrainSpec
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec, check
from offside.eval.metrics import METRICS
from offside.eval.summary import FORGET_SET, UTILITY_SETS
from offside.models.loading import DTYPES, LoraSpec
from offside.recipes import TINY_UNLEARN
from offside.unlearn import get_method

SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
OBJECTIVE_MODES = ("constrained", "pareto")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SUMMARY_METRICS = ("summary/forget_efficacy", "summary/model_utility")
# Keys a search space may set, as dotted paths into a trial's settings.
SPACE_ROOTS = ("method", "method_args", "train", "lora", "forget_fraction")


@dataclass
class ObjectiveSpec:
    """constrained: maximise `metric` subject to `constraint` ≥ `min_value` (utility ≥ 90 % of vanilla);
    pareto: maximise both `metric` and `constraint` (multi-objective Optuna), report the front."""

    mode: str = "constrained"
    metric: str = "summary/forget_efficacy"
    constraint: str = "summary/model_utility"
    min_value: float = 0.9


@dataclass
class SchedulerSpec:
    name: str = "asha"  # ASHA on the epoch each trial reports; fifo runs every trial to the end
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class ResourceSpec:
    workers: int = 2  # DeepSpeed ranks (Ray Train workers) per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent: int = 1  # trials at once
    local_cpus: int = 4  # logical CPUs of the in-process local Ray (ignored with --address)


@dataclass
class SweepConfig:
    name: str = ""
    storage: str = "runs/tune"  # sweeps live in <storage>/<name>; shared storage (NFS) on a multi-node cluster
    data: str = ""
    vanilla: str = ""
    dtype: str = "fp32"  # the vanilla model's dtype in trials, vanilla scoring and export (bf16 on GPUs)
    device: str = "auto"  # the driver's scoring and export; trial ranks use the GPU Ray gives them
    methods: list[str] = field(default_factory=lambda: ["ga"])
    scenario: str = "complete"
    forget_fraction: float = 1.0
    method_args: dict = field(default_factory=dict)
    train: TrainSpec = field(default_factory=lambda: replace(TINY_UNLEARN))
    lora: LoraSpec | None = None
    freeze_vision: bool = True
    search_space: dict = field(default_factory=dict)  # dotted key → {choice|grid|uniform|loguniform|randint: [...]}
    search: str = "random"
    num_samples: int = 4  # trials (random / optuna); grid runs every point once
    seed: int = 0
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    epoch_eval: EvalSpec = field(default_factory=lambda: EvalSpec(splits=["forget", "retain", "test"], forms=["mcq"], limit=16))
    max_failures: int = 2  # worker-level restarts of one trial's Train run (resumes from its checkpoint)
    trial_max_failures: int = 1  # trial-level retries by Tune
    system_metrics_s: float = 10.0  # each rank's CPU/memory/GPU sampled this often into the trial's run; 0: off
    export_best: bool = True
    register: bool = True  # the exported best model becomes a version of registered model offside-<name>, alias best


def load_sweep(path: str | Path, overrides: dict | None = None) -> SweepConfig:
    config = load_yaml(SweepConfig, path, overrides)
    validate(config, str(path))
    return config


def sweep_from_dict(data: dict, source: str = "<sweep>") -> SweepConfig:
    config = from_dict(SweepConfig, data, source)
    validate(config, source)
    return config


def validate(config: SweepConfig, source: str) -> None:
    def fail(message: str):
        raise OffsideError(f"{source}: {message}")

    if not config.name or "/" in config.name:
        fail(f"'name' must be a non-empty name without '/', got {config.name!r}")
    for key in ("data", "vanilla"):
        if not getattr(config, key):
            fail(f"'{key}' is required")
    for key, value, valid in (("search", config.search, SEARCHERS), ("scheduler.name", config.scheduler.name, SCHEDULERS),
                              ("objective.mode", config.objective.mode, OBJECTIVE_MODES), ("scenario", config.scenario, SCENARIOS), ("dtype", config.dtype, DTYPES)):
        if value not in valid:
            fail(f"'{key}': unknown {value!r} (valid: {', '.join(valid)})")
    if not config.methods:
        fail("'methods' is empty")
    try:
        check(config.epoch_eval)
        for method in method_choices(config):
            get_method(method, config.method_args, f"{source}: method_args")
    except OffsideError as err:
        fail(str(err))
    if config.resources.workers < 1 or config.resources.max_concurrent < 1 or config.num_samples < 1:
        fail("'resources.workers', 'resources.max_concurrent' and 'num_samples' must be ≥ 1")
    if config.system_metrics_s < 0:
        fail(f"'system_metrics_s' must be ≥ 0 (0: off), got {config.system_metrics_s}")
    if config.objective.mode == "pareto" and config.search != "optuna":
        fail("objective.mode 'pareto' needs search 'optuna' (multi-objective TPE)")
    _check_space(config, fail)
    produced = produced_metrics(config.epoch_eval)
    for key in ("metric", "constraint"):
        name = getattr(config.objective, key)
        if name not in produced:
            fail(f"objective.{key}: no suite produces metric {name!r} with this epoch_eval "
                 f"(e.g. {', '.join(SUMMARY_METRICS)}, forget/image/all/mcq_acc)")


def method_choices(config: SweepConfig) -> list[str]:
    space = config.search_space.get("method")
    return list(next(iter(space.values()))) if isinstance(space, dict) and space else list(config.methods)


def _check_space(config: SweepConfig, fail) -> None:
    if not config.search_space:
        fail("'search_space' is empty: give at least one dimension, e.g. train.lr: {loguniform: [1e-4, 1e-3]}")
    for key, dist in config.search_space.items():
        root = key.split(".")[0]
        if root not in SPACE_ROOTS:
            fail(f"search_space.{key}: cannot be searched (valid roots: {', '.join(SPACE_ROOTS)})")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            fail(f"search_space.{key}: must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {dist!r}")
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list) or not values:
            fail(f"search_space.{key}: '{kind}' needs a non-empty list of values")
        if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not values[0] < values[1]):
            fail(f"search_space.{key}: '{kind}' needs [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            fail(f"search_space.{key}: 'loguniform' needs a positive low bound")
        if config.search == "grid" and kind not in ("choice", "grid"):
            fail(f"search_space.{key}: grid search needs explicit values (choice/grid), got '{kind}'")
        if config.search == "optuna" and kind == "grid":
            fail(f"search_space.{key}: 'grid' values work with search: grid; use 'choice' with optuna")
        if root == "train" and key.split(".", 1)[1] not in TrainSpec.__dataclass_fields__:
            fail(f"search_space.{key}: unknown training setting (valid: {', '.join(TrainSpec.__dataclass_fields__)})")
        if root == "lora" and (config.lora is None or key.split(".", 1)[1] not in LoraSpec.__dataclass_fields__):
            fail(f"search_space.{key}: needs a 'lora' section and a LoRA setting ({', '.join(LoraSpec.__dataclass_fields__)})")
    for method in method_choices(config):
        for key, dist in config.search_space.items():
            if key.startswith("method_args."):
                try:
                    get_method(method, {**config.method_args, key.split(".", 1)[1]: next(iter(dist.values()))[0]})
                except OffsideError as err:
                    fail(f"search_space.{key}: not a setting of method {method!r}: {err}")


def produced_metrics(spec: EvalSpec) -> set[str]:
    """Every metric key the per-epoch evaluation (plus the summary and training loss) can report."""
    groups = ("all", *KINDS, *[k for k in RUMOUR_KINDS if k != "none"])
    names = {f"{s}/{m}/{g}/{n}" for s in spec.splits for m in spec.modalities for g in groups
             for f in spec.forms for n in METRICS[f]}
    summary = set(SUMMARY_METRICS) if "mcq" in spec.forms and {FORGET_SET, *UTILITY_SETS} <= set(spec.splits) else set()
    return names | summary | {"train/loss", "objective"}


def max_epochs(config: SweepConfig) -> int:
    dist = config.search_space.get("train.epochs")
    if not dist:
        return config.train.epochs
    kind, values = next(iter(dist.items()))
    return int(values[1]) - 1 if kind == "randint" else int(max(values))


def trial_count(config: SweepConfig) -> int:
    if config.search != "grid":
        return config.num_samples
    implicit_methods = len(config.methods) if len(config.methods) > 1 and "method" not in config.search_space else 1
    return implicit_methods * math.prod(len(next(iter(d.values()))) for d in config.search_space.values())


def objective_value(metrics: dict[str, float], objective: ObjectiveSpec) -> float:
    """The one number ASHA and single-objective searchers maximise. constrained: `metric` when
    `constraint` ≥ min_value; otherwise −10 + constraint/min_value, below every feasible value (the
    summary scores live in about [−1, 1]) yet still ranking infeasible trials by how close they came."""
    value, bound = metrics[objective.metric], metrics[objective.constraint]
    if objective.mode == "pareto" or bound >= objective.min_value:
        return float(value)
    return -10.0 + float(bound) / objective.min_value if objective.min_value > 0 else -10.0


def apply_sample(base: dict, sample: dict) -> dict:
    """A trial's settings: the sweep's base settings with the sampled dotted keys set."""
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in sample.items():
        parts = key.split(".")
        target = settings
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return settings
