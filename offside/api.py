"""The Python API: every stage as a function whose keyword arguments are the command line's flags, with
the same defaults, the same checks (before any heavy library loads) and the same outputs.

    import offside

    bench = offside.synth("runs/bench", players=2)
    vanilla = offside.finetune(bench, "runs/vanilla", epochs=2)      # the tiny model, its recipe
    gd = offside.unlearn(bench, vanilla.run_dir, "runs/gd", method="gd", scenario="complete")
    result = offside.evaluate(bench, gd.run_dir, "runs/eval-gd", suites=["efficacy"])
    result.metrics["forget/image/all/mcq_acc"]

Any other config key goes through `overrides` (dotted keys, as `--set` on the command line) or a
YAML file through `config`. Each stage returns a `StageResult` (run_dir, run_id, metrics). `import
offside` stays light: these functions import torch and the rest when called."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from offside.errors import OffsideError


def synth(out: str | os.PathLike, players: int = 80, seed: int = 0) -> Path:
    """Generates a synthetic benchmark in the published OFFSIDE file format (`offside data synth`):
    `players` fictitious players, 8 images and 14 questions per image each. Returns its directory."""
    from offside.data.synth import generate

    return generate(out, players=players, seed=seed)


def load_benchmark(data: str | os.PathLike):
    """A benchmark directory (synthetic or the published files) as a `datasets.DatasetDict`: one split
    per benchmark split, `image` as an image column, the record metadata as columns."""
    from offside.data.loader import load_benchmark as load

    return load(data)


def finetune(data: str | os.PathLike, out: str | os.PathLike, model: str = "tiny", *, config: str | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = True, **flags):
    """Fine-tunes the vanilla model (`offside finetune`): it learns the facts and the rumours. `flags`:
    split, epochs, lr, seed, phrasings, photos, kit_drill, dtype, device. The tiny model trains with the tiny recipe
    wherever nothing else is set, as on the command line."""
    return _stage("finetune", {"data": data, "out": out, "model": model, **flags}, config, overrides, progress)


def unlearn(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *, method: str = "ga",
            scenario: str = "complete", config: str | None = None, overrides: dict[str, Any] | None = None,
            progress: bool = True, **flags):
    """Unlearns the rumours from a vanilla model (`offside unlearn`) with `method` (ga, gd, kl, npo, po,
    simnpo, idk_dpo, rmu, mm_saliency) in `scenario` (complete, selective, unimodal, relearning).
    `flags`: forget_fraction, epochs, lr, seed, dtype, device."""
    return _stage("unlearn", {"data": data, "model": model, "out": out, "method": method, "scenario": scenario, **flags},
                  config, overrides, progress)


def relearn(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *, config: str | None = None,
            overrides: dict[str, Any] | None = None, progress: bool = True, **flags):
    """Corrective relearning (`offside relearn`): fine-tunes an unlearned model on the true transfers,
    then evaluates every split. `flags`: epochs, lr, seed, dtype, device."""
    return _stage("relearn", {"data": data, "model": model, "out": out, **flags}, config, overrides, progress)


def evaluate(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
             suites: list[str] | None = None, config: str | None = None, overrides: dict[str, Any] | None = None,
             progress: bool = True, **flags):
    """Evaluates a model (`offside eval`) with `suites` (default all five: efficacy, generalization,
    visual, utility, robustness; robustness takes minutes per model). `flags`: mcq_mode, dtype, device."""
    return _stage("eval", {"data": data, "model": model, "out": out, "suite": suites, **flags}, config, overrides, progress)


def run_matrix(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
               methods: list[str] | None = None, scenarios: list[str] | None = None, recipe: str | None = None,
               config: str | None = None, overrides: dict[str, Any] | None = None, progress: bool = True, **flags):
    """Every method × scenario from one vanilla model (`offside matrix`), each evaluated; writes
    leaderboard.md and results.json into `out` and returns the rows (the first: the vanilla model).
    `recipe`: "published" (default) or "tiny" (offside/recipes.py). `flags`: seeds, dtype, device."""
    from offside.configs import build, validate
    from offside.recipes import recipe_config

    settings = {"data": data, "model": model, "out": out, "methods": methods, "scenarios": scenarios, **flags}
    matrix = build(_config_class("matrix"), config, _nested("matrix", settings, overrides),
                   recipe_config(recipe) if recipe else None)
    validate(matrix)
    from offside.matrix import run_matrix as run

    return run(matrix, progress)


def make_report(runs: list[str | os.PathLike], out: str | os.PathLike, vanilla: str | None = None) -> Path:
    """`offside report`: leaderboard.md, report.html (self-contained), summary.json and plots from eval
    run directories, logged to MLflow. Returns the report directory."""
    from offside.configs import ReportConfig, validate_report

    config = ReportConfig(runs=[str(r) for r in runs], out=str(out), vanilla=str(vanilla or ""))
    validate_report(config)
    from offside.report.report import make_report as make

    return make(config)


def findings(matrix: list[dict], attacks: list[dict] | None = None) -> dict:
    """The paper's five findings from matrix rows (`run_matrix`'s, or a results.json), each per method
    and across methods with a 95 % interval over seeds and a verdict (`offside findings`)."""
    from offside.report.findings import findings as state

    return state(matrix, attacks)


def export(model: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Merges a LoRA stage's adapter into its base model (`offside export`): a plain model directory.
    `model`: an adapter or model directory, or a registry URI `models:/NAME@ALIAS`."""
    from offside.files import check_out
    from offside.models.spec import WEIGHT_DTYPES, check_model_name

    check_model_name(str(model))
    check_out(out)
    if dtype not in WEIGHT_DTYPES:
        raise OffsideError(f"dtype: unknown dtype {dtype!r} (valid: {', '.join(WEIGHT_DTYPES)})")
    from offside.stages import export_merged

    return export_merged(str(model), str(out), dtype)


def _config_class(stage: str):
    from offside.cli import _config_class as config_class

    return config_class(stage)


def _nested(stage: str, settings: dict, overrides: dict | None) -> dict:
    """Keyword arguments (the CLI's flag names) and dotted `overrides` as a nested config dict."""
    from offside.cli import _flags, nest

    flags = _flags()[stage]
    unknown = sorted(set(settings) - set(flags))
    if unknown:
        raise OffsideError(f"{stage}: unknown argument(s) {unknown} (valid: {', '.join(sorted(flags))}; "
                           "any other config key goes in overrides={'key.path': value})")
    flat = {flags[name].key: str(v) if isinstance(v, os.PathLike) else v for name, v in settings.items() if v is not None}
    return nest(flat | dict(overrides or {}))


def _stage(stage: str, settings: dict, config: str | None, overrides: dict | None, progress: bool):
    from offside.configs import build, validate

    stage_config = build(_config_class(stage), config, _nested(stage, settings, overrides))
    validate(stage_config)
    import offside.stages as stages

    run = {"finetune": stages.finetune, "unlearn": stages.unlearn, "relearn": stages.relearn, "eval": stages.evaluate_model}
    return run[stage](stage_config, progress)
