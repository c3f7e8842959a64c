"""The stages' typed configs and the checks that need no model: importable without torch, Ray or
DeepSpeed, so the command line and the Python API report a wrong key, type, choice or path in a
moment, before any heavy library loads. `offside/stages.py`, `matrix.py` and `report/report.py` run them.

`build(cls, file, overrides)` is the one way a config is made from a YAML file and overrides (CLI
flags, `--set`, keyword arguments of the Python API): the file < the overrides, every key and type
checked (offside/config.py). A fine-tune of the tiny model starts from the tiny recipe
(offside/recipes.py) wherever the user set nothing, in the CLI, the API and `FinetuneConfig()` alike."""

from __future__ import annotations

import importlib.util
import pkgutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from offside.config import deep_merge, from_dict, read_yaml
from offside.data.kits import check_kit_drill
from offside.data.phrasings import check_photos, check_phrasings
from offside.data.schema import DATA_FILES, MODALITIES, REQUIRED_SPLITS, SCENARIOS, split_files
from offside.engine.spec import TrainSpec, check_train
from offside.errors import OffsideError
from offside.eval.spec import CHEAP_SUITES, SUITES, EvalSpec, RobustnessSpec, UtilitySpec, check, check_suites
from offside.files import check_out
from offside.models.spec import DTYPE_CHOICES, LoraSpec, ModelSpec, check_model, check_model_name
from offside.recipes import PUBLISHED_RELEARN, PUBLISHED_UNLEARN, TINY_KIT_DRILL, TINY_PHRASINGS, tiny_vanilla

T = TypeVar("T")
FINETUNE_SPLITS = {"retain+forget": ("retain", "forget"), "retain": ("retain",), "relearn": ("relearn",)}
EVAL_SUITES = list(SUITES)  # `offside eval` and `EvalConfig()` run all five


@dataclass
class FinetuneConfig:
    """`offside finetune`: the vanilla model (split retain+forget), or a reference model."""

    data: str = ""
    out: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec | None = None  # None: the model's recipe (the tiny recipe for `tiny`, else the published one)
    split: str = "retain+forget"  # the vanilla model; "retain" makes the retain-only reference model
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    epoch_eval: EvalSpec | None = None  # evaluate at every epoch end (logged to MLflow)
    # each training question in this many wordings: the canonical one + drawn others (offside/data/phrasings.py);
    # None: the recipe's (3 for the tiny model with its recipe, else 1)
    phrasings: int | None = None
    # photos of each retain context: the published one + photos − 1 new ones, shown with the other wordings
    # (synthetic benchmarks only; offside/data/photos.py). 1 in every recipe: on the tiny model new photos did
    # not teach the club from the kit (docs/results.md, the visual-reading suite)
    photos: int = 1
    # photos per club of anonymous players in its kit, asked the club question, and for the tiny model a vision
    # tower pre-trained on kits and looks, so that it reads kits (synthetic benchmarks; none on data without a
    # generator, with a note; offside/data/kits.py). None: the recipe's (TINY_KIT_DRILL for the tiny model
    # with its recipe, else 0)
    kit_drill: int | None = None


@dataclass
class UnlearnConfig:
    """`offside unlearn`: one method in one scenario, from a vanilla model."""

    data: str = ""
    out: str = ""
    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="", freeze_vision=True))
    method: str = "ga"
    method_args: dict = field(default_factory=dict)
    scenario: str = "complete"
    forget_fraction: float = 1.0  # unlearn the forget data of this share of the players
    train: TrainSpec = field(default_factory=TrainSpec)
    relearn: TrainSpec = field(default_factory=lambda: replace(PUBLISHED_RELEARN))  # scenario "relearning" only
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    epoch_eval: EvalSpec | None = None


@dataclass
class RelearnConfig:
    """Corrective relearning: fine-tune an unlearned model on the relearn set (the true facts), then
    evaluate every split (does the rumour resurface? is the truth learned?)."""

    data: str = ""
    out: str = ""
    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="", freeze_vision=True))
    train: TrainSpec = field(default_factory=lambda: replace(PUBLISHED_RELEARN))
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    epoch_eval: EvalSpec | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)


@dataclass
class EvalConfig:
    """`offside eval`: the suites (all five by default; robustness costs minutes per model)."""

    data: str = ""
    out: str = ""
    model: ModelSpec = field(default_factory=lambda: ModelSpec(name=""))
    eval: EvalSpec = field(default_factory=EvalSpec)
    suites: list[str] = field(default_factory=lambda: list(EVAL_SUITES))
    utility: UtilitySpec = field(default_factory=UtilitySpec)
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)


@dataclass
class MatrixConfig:
    """`offside matrix`: every method × scenario from one vanilla model."""

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
class ReportConfig:
    """`offside report`: eval run directories → leaderboard, report.html, plots."""

    runs: list[str] = field(default_factory=list)
    out: str = ""
    vanilla: str = ""  # eval dir of the vanilla model; default: the run whose model came from finetune


def build(cls: type[T], file: str | None = None, overrides: dict | None = None, base: dict | None = None) -> T:
    """A config from `base` (e.g. a recipe) < an optional YAML file < nested overrides, checked key by
    key; a fine-tune of the tiny model starts from the tiny recipe wherever none of them sets a value."""
    source = file or "command line"
    data = deep_merge(deep_merge(base or {}, read_yaml(file) if file else {}), overrides or {})
    config = from_dict(cls, data, source)
    if cls is FinetuneConfig and config.model.name == "tiny":
        phrasings = TINY_PHRASINGS if config.phrasings is None else config.phrasings
        check_phrasings(phrasings)
        recipe = {"phrasings": phrasings, "kit_drill": TINY_KIT_DRILL, "train": asdict(tiny_vanilla(phrasings))}
        config = from_dict(cls, deep_merge(recipe, data), source)
    return config


def resolved(config: FinetuneConfig) -> FinetuneConfig:
    """The recipe of a FinetuneConfig whose train (or phrasings, or kit_drill) is unset: the tiny recipe
    for the tiny model (3 wordings, TINY_VANILLA's epochs divided by them, the kit drill), else the
    published defaults."""
    recipe = config.train is None and config.model.name == "tiny"
    phrasings = config.phrasings if config.phrasings is not None else (TINY_PHRASINGS if recipe else 1)
    check_phrasings(phrasings)
    kit_drill = config.kit_drill if config.kit_drill is not None else (TINY_KIT_DRILL if recipe else 0)
    check_kit_drill(kit_drill)
    train = config.train or (tiny_vanilla(phrasings) if recipe else TrainSpec())
    return replace(config, train=train, phrasings=phrasings, kit_drill=kit_drill)


def method_names() -> list[str]:
    """The unlearning methods, one file each in offside/unlearn/, listed without importing them (a test
    checks the list against the registry)."""
    package = importlib.util.find_spec("offside.unlearn")
    return sorted(m.name for m in pkgutil.iter_modules(package.submodule_search_locations) if not m.name.startswith("_"))


def check_data_dir(data: str) -> None:
    if not data:
        raise OffsideError("data: a benchmark directory is required (--data)")
    if not Path(data).is_dir():
        raise OffsideError(f"{data}: benchmark directory not found")
    for split in REQUIRED_SPLITS:
        if not split_files(Path(data), split):
            raise OffsideError(f"{data}: no {split} file (expected {DATA_FILES[split, 'image', 'gen']})")


def _check_modalities(modalities: list[str]) -> None:
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise OffsideError(f"modalities: unknown {unknown} (valid: {', '.join(MODALITIES)})")


def _check_method(method: str) -> None:
    if method not in method_names():
        raise OffsideError(f"unknown method {method!r} (available: {', '.join(method_names())})")


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise OffsideError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")


def validate(config) -> None:
    """Everything about a stage config that can be checked without loading a model or the data: the
    output directory is new, the data directory and a local model directory exist, every closed set
    holds. Each stage calls it first; the CLI calls it before importing the stage."""
    check_out(config.out)
    check_data_dir(config.data)
    if isinstance(config, MatrixConfig):
        _validate_matrix(config)
        return
    check_model(config.model)
    for spec in (getattr(config, "train", None), getattr(config, "relearn", None)):
        if spec is not None:
            check_train(spec)
    _check_modalities(getattr(config, "modalities", []))
    for spec in (getattr(config, "epoch_eval", None), getattr(config, "eval", None)):
        if spec is not None:
            check(spec)
    if isinstance(config, FinetuneConfig):
        if config.split not in FINETUNE_SPLITS:
            raise OffsideError(f"split: unknown {config.split!r} (valid: {', '.join(FINETUNE_SPLITS)})")
        check_photos(config.photos, resolved(config).phrasings)
    elif isinstance(config, UnlearnConfig):
        _check_method(config.method)
        _check_scenario(config.scenario)
        if not 0 < config.forget_fraction <= 1:
            raise OffsideError(f"forget_fraction: must be in (0, 1], got {config.forget_fraction}")
    elif isinstance(config, EvalConfig):
        check_suites(config.suites, config.robustness)


def _validate_matrix(config: MatrixConfig) -> None:
    check_model_name(config.model)
    if config.dtype not in DTYPE_CHOICES:
        raise OffsideError(f"dtype: unknown dtype {config.dtype!r} (valid: {', '.join(DTYPE_CHOICES)})")
    for method in config.methods:
        _check_method(method)
    for scenario in config.scenarios:
        _check_scenario(scenario)
    check_train(config.train)
    check_train(config.relearn, "relearn")
    check(config.eval)
    check_suites(config.suites, config.robustness)
    if config.seeds < 1:
        raise OffsideError(f"seeds must be ≥ 1, got {config.seeds}")


def validate_report(config: ReportConfig) -> None:
    check_out(config.out)
    if not config.runs:
        raise OffsideError("report: at least one run directory is required (--runs)")
    for run in [*config.runs, *([config.vanilla] if config.vanilla else [])]:
        if not Path(run, "metrics.json").is_file():
            raise OffsideError(f"{run}: not an eval run directory (no metrics.json)")
