"""The pipeline's stages: finetune, unlearn, eval. Each is a function of a typed config that writes
its own directory (atomically: built under a hidden temp name, renamed when complete) and is one
MLflow run. A stage never writes into an existing non-empty directory.

Under a launcher (torchrun, deepspeed) every rank runs the stage: all of them train and evaluate
(each its share of the rows), rank 0 alone writes the directory and logs the MLflow run, and every
rank returns rank 0's result. Ranks on several nodes need the output directory on shared storage."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from offside import __version__
from offside.config import to_dict
from offside.configs import (FINETUNE_SPLITS, EvalConfig, FinetuneConfig, RelearnConfig,  # noqa: F401  (configs: re-exported)
                             UnlearnConfig, resolved, validate)
from offside.data.kits import VISION_CLASSES, drill_book, kit_drill, vision_pretraining
from offside.data.loader import data_hash, load_benchmark
from offside.data.phrasings import photo_book, with_phrasings
from offside.data.rows import materialise
from offside.data.scenarios import forget_share, select
from offside.data.schema import MODALITIES
from offside.engine.finetune import FineTune
from offside.engine.trainer import TrainSpec, ensure_distributed, from_main_rank, is_main_rank, launched, train
from offside.errors import OffsideError
from offside.files import atomic_dir, check_out
from offside.eval.evaluate import EvalSpec, check, evaluate
from offside.eval.sanity import checked
from offside.eval.suites import check_suites, run_suites
from offside.models.loading import (ModelSpec, adapter_lora, build_or_load, gathered_for_save, resolve_device, resolved_dtype,
                                   save)
from offside.models.tiny import pretrain_vision
from offside.provenance import git_sha, model_provenance
from offside.registry import LocalModel, local_model
from offside.tracking import Run, stage_run, tracking_uri
from offside.unlearn import get_method


@dataclass
class StageResult:
    """What a stage returns: its directory (absolute), its MLflow run id and its final metrics."""

    run_dir: Path
    run_id: str
    metrics: dict[str, float]


def finetune(config: FinetuneConfig, progress: bool = True) -> StageResult:
    """Fine-tunes `config.model` on `config.split` (default retain+forget: the vanilla model, which
    learns the facts and the rumours) and saves it to `config.out`. An unset `train` is the model's
    recipe (the tiny recipe for `tiny`). The vanilla model is checked for having learned the benchmark
    (manifest.json `vanilla_check`; a warning when it has not)."""
    validate(config)
    config, models = _started(resolved(config))
    bench = load_benchmark(config.data)
    book = photo_book(config.data, config.photos)
    rows = [r for split in FINETUNE_SPLITS[config.split] for r in materialise(bench[split])]
    streams = {"train": with_phrasings(training_rows(rows, config.modalities), config.phrasings, config.train.seed,
                                       config.photos, book)}
    kits, drill_notes = drill_book(config.data, config.kit_drill if "image" in config.modalities else 0)
    drill = kit_drill(kits, config.kit_drill, config.train.seed) if kits is not None else []
    streams["train"] += drill
    texts = [t for split in bench.values() for column in ("question", "answer") for t in split[column]]
    if config.phrasings > 1 or drill:  # the other wordings' (and the drill's) words join the tiny tokenizer's text
        texts += [r["question"] for r in streams["train"]]
    model, processor = build_or_load(models.spec(config.model), texts, seed=config.train.seed, train=config.train)
    manifest: dict = {"kit_drill": {"rows": len(drill), "notes": drill_notes}} if config.kit_drill else {}
    for note in drill_notes:
        print(f"note: {note}", file=sys.stderr)

    def body(out: Path, run: Run) -> dict[str, float]:
        if kits is not None and config.model.name == "tiny":  # a real model's vision encoder is pre-trained already
            manifest["vision_pretraining"] = pretrain_vision(model, processor, *vision_pretraining(kits, config.train.seed),
                                                             VISION_CLASSES, seed=config.train.seed)
        metrics = _fit_and_save(out, run, model, processor, FineTune(), streams, config.train, config, bench, progress)
        if config.split == "retain+forget":  # the vanilla model
            manifest["vanilla_check"] = checked(model, processor, bench, config.out)
        return metrics

    return run_stage("finetune", config, models, {"stage": "finetune", "split": config.split}, body, manifest)


def unlearn(config: UnlearnConfig, progress: bool = True, vanilla_check: dict | None = None) -> StageResult:
    """Unlearns `config.method` in `config.scenario` from the vanilla model `config.model` and saves the
    unlearned model (for scenario `relearning`: the unlearned one under `out/unlearned`, the relearned
    one in `out`). `vanilla_check`: the check of config.model when the caller has made it already (the
    matrix)."""
    validate(config)
    get_method(config.method, config.method_args)  # a bad method or argument fails before any download
    config, models = _started(config)
    method = get_method(config.method, models.method_args(config.method_args))
    bench = load_benchmark(config.data)
    forget, retain = select(bench, config.scenario)
    forget = forget_share(forget, config.forget_fraction, config.train.seed)
    streams = {"forget": training_rows(materialise(forget), config.modalities),
               "retain": training_rows(materialise(retain), config.modalities)}
    relearn_rows = training_rows(materialise(bench["relearn"]), config.modalities) if config.scenario == "relearning" else []
    model, processor = build_or_load(models.spec(config.model), seed=config.train.seed, train=config.train)
    manifest = {"vanilla_check": vanilla_check or checked(model, processor, bench, config.model.name)}
    tags = {"stage": "unlearn", "method": config.method, "scenario": config.scenario}

    def body(out: Path, run: Run) -> dict[str, float]:
        if config.scenario != "relearning":
            return _fit_and_save(out, run, model, processor, method, streams, config.train, config, bench, progress)
        metrics = _fit_and_save(out / "unlearned", run, model, processor, method, streams, config.train, config, bench, progress)
        relearner, _ = build_or_load(replace(config.model, name=str(out / "unlearned")), train=config.relearn)
        relearned = _fit_and_save(out, run, relearner, processor, FineTune(), {"train": relearn_rows}, config.relearn,
                                  config, bench, progress, step_offset=config.train.epochs)
        return metrics | {f"relearn/{k}": v for k, v in relearned.items()}

    return run_stage("unlearn", config, models, tags, body, manifest)


def relearn(config: RelearnConfig, progress: bool = True) -> StageResult:
    """Corrective relearning: fine-tunes an unlearned model on the relearn set (the true transfers),
    saves it, and evaluates every split (predictions.jsonl)."""
    validate(config)
    config, models = _started(config)
    bench = load_benchmark(config.data)
    model, processor = build_or_load(models.spec(config.model), seed=config.train.seed, train=config.train)
    streams = {"train": training_rows(materialise(bench["relearn"]), config.modalities)}
    rows = {split: materialise(bench[split]) for split in config.eval.splits}

    def body(out: Path, run: Run) -> dict[str, float]:
        trained = _fit_and_save(out, run, model, processor, FineTune(), streams, config.train, config, bench, progress)
        relearned, _ = build_or_load(replace(config.model, name=str(out), lora=None))
        return trained | _evaluate_into(out, relearned, processor, rows, config.eval, progress)

    return run_stage("relearn", config, models, {"stage": "relearn", "model": config.model.name}, body)


def evaluate_model(config: EvalConfig, progress: bool = True) -> StageResult:
    """Evaluates `config.model` with `config.suites` (default all five) and writes metrics.json,
    predictions.jsonl (and attacks.jsonl, notes.txt for the robustness suite) to `config.out`."""
    validate(config)
    check_suites(config.suites, config.robustness)  # attack names, against the registry
    config, models = _started(config)
    bench = load_benchmark(config.data)
    model, processor = build_or_load(models.spec(config.model))
    rows = {split: materialise(bench[split]) for split in bench}
    if config.robustness.relearn_lora is None:  # a LoRA stage is attacked as it was trained: with LoRA (config.yaml says so)
        config = replace(config, robustness=replace(config.robustness, relearn_lora=adapter_lora(Path(models.model.path))))
    robustness = config.robustness

    def body(out: Path, run: Run) -> dict[str, float]:
        result = run_suites(model, processor, rows, config.suites, config.eval, config.utility, robustness,
                            out, progress, data_dir=config.data)
        if is_main_rank():
            _write_jsonl(out / "predictions.jsonl", result.predictions)
            if result.attack_records:
                _write_jsonl(out / "attacks.jsonl", result.attack_records)
            if result.notes:
                (out / "notes.txt").write_text("\n".join(result.notes) + "\n")
        return result.metrics

    tags = {"stage": "eval", "model": config.model.name, "suites": ",".join(config.suites)}
    return run_stage("eval", config, models, tags, body)


def export_merged(model: str, out: str, dtype: str = "fp32") -> Path:
    """`offside export`: a LoRA stage's adapter (and the adapters it was trained on) merged into its
    base, saved as a plain model directory, with the stage's config.yaml and manifest.json (so the
    report reads its method and scenario) and export.json naming what it came from."""
    target = check_out(out)
    named = local_model(model, tracking_uri(target.resolve().parent))
    source = Path(named.path)
    merged, processor = build_or_load(ModelSpec(named.path, dtype=dtype, device="cpu"))
    with atomic_dir(target) as tmp:
        save(merged, processor, tmp, merge=True)
        for name in ("config.yaml", "manifest.json"):
            if (source / name).exists():
                shutil.copy2(source / name, tmp / name)
        origin = {"from": named.name, "version": named.version} if named.version else {"from": named.name}
        (tmp / "export.json").write_text(json.dumps(origin | {"dtype": dtype}, indent=2) + "\n")
    return target


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def training_rows(rows: list[dict], modalities: list[str]) -> list[dict]:
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise OffsideError(f"modalities: unknown {unknown} (valid: {', '.join(MODALITIES)})")
    return [r for r in rows if r["form"] == "gen" and r["modality"] in modalities]


def _evaluate_into(out: Path, model, processor, rows, spec: EvalSpec, progress: bool) -> dict[str, float]:
    metrics, predictions = evaluate(model, processor, rows, spec, progress)
    if is_main_rank():
        _write_jsonl(out / "predictions.jsonl", predictions)
    return metrics


def _fit_and_save(out: Path, run: Run, model, processor, objective, streams, spec: TrainSpec, config, bench,
                  progress: bool, step_offset: int = 0) -> dict[str, float]:
    """Trains with the engine (per-epoch metrics to MLflow), saves the model into `out`, and returns
    the final epoch's summary. Every rank returns once the model is saved (so it may be reloaded)."""
    out.mkdir(parents=True, exist_ok=True)
    callbacks = [lambda epoch, _model, logs: run.log_metrics(logs, step=step_offset + epoch)]
    if progress and is_main_rank():
        callbacks.append(lambda epoch, _model, logs: _epoch_line(epoch, spec.epochs, logs))
    if config.epoch_eval is not None:
        check(config.epoch_eval)
        eval_rows = {s: materialise(bench[s]) for s in config.epoch_eval.splits}
        callbacks.insert(0, lambda epoch, m, logs: evaluate(m, processor, eval_rows, config.epoch_eval, False)[0])
    result = train(model, processor, objective, streams, spec, out / "checkpoints", callbacks=callbacks, progress=progress)
    with gathered_for_save(model):
        if is_main_rank():
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the saved model supersedes them
            save(model, processor, out)
            (out / "history.json").write_text(json.dumps(result.history, indent=2) + "\n")
    from_main_rank(None)  # a barrier: the model is on disk for every rank
    final = result.history[-1] if result.history else {}
    # Per-epoch values are already logged at their epoch; the summary gets its own names.
    return {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))} | {"steps": result.steps}


def _epoch_line(epoch: int, epochs: int, logs: dict) -> None:
    """One line per finished epoch, kept on screen (the epoch's progress bar is not)."""
    from tqdm.auto import tqdm

    tqdm.write(f"  epoch {epoch}/{epochs}: loss {logs.get('train/loss', float('nan')):.4f} (step {logs.get('step', 0)})")


def run_stage(stage: str, config, models: StageModels, tags: dict[str, str], body: Callable[[Path, Run], dict],
              manifest: dict | None = None) -> StageResult:
    """Runs `body` in a temp directory beside `config.out` and renames it into place on success;
    on failure the temp directory is removed and the MLflow run is marked FAILED. `manifest`: extra
    manifest.json entries, read when `body` has returned (so it may add to them); `models`: what
    `_started` resolved the stage's models to. Under a launcher,
    ranks other than 0 run `body` in rank 0's directory, writing nothing and logging nowhere."""
    out = check_out(config.out)
    if launched():
        ensure_distributed()
    if not is_main_rank():
        tmp, run_id = from_main_rank(None)
        body(Path(tmp), _NoRun())
        metrics = from_main_rank(None)  # rank 0 renames the directory once every rank is done with it
        return StageResult(out.resolve(), run_id, metrics)
    started = time.time()
    with atomic_dir(out) as tmp, stage_run(out.parent, out.name, to_dict(config), tags) as run:
        from_main_rank((str(tmp), run.run_id))
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        metrics = from_main_rank(body(tmp, run))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        entries = _manifest(stage, config, models, started, run.run_id) | (manifest or {})
        (tmp / "manifest.json").write_text(json.dumps(entries, indent=2) + "\n")
        run.log_metrics(metrics)
        run.log_artifacts(tmp)
    return StageResult(out.resolve(), run.run_id, metrics)  # absolute: results files are read from anywhere


class _NoRun:
    """Where ranks other than 0 log: nowhere (rank 0 holds the stage's MLflow run)."""

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass


@dataclass(frozen=True)
class StageModels:
    """The models a stage names, resolved once at its start (`_started`): what everything after loads."""

    model: LocalModel
    reference: LocalModel | None = None  # a method's reference model (method_args.reference), if a model

    def spec(self, spec: ModelSpec) -> ModelSpec:
        return replace(spec, name=self.model.path)

    def method_args(self, args: dict) -> dict:
        return args | {"reference": self.reference.path} if self.reference else args

    def manifest(self) -> dict:
        """Registry URI and version of the model (None for a directory) and of a registered reference."""
        reference = self.reference.manifest("reference") if self.reference and self.reference.version else {}
        return self.model.manifest("model") | reference


def _started(config):
    """A stage's start: its config with its paths absolute (config.yaml, the manifest and the MLflow
    params are read from anywhere), and the models it names resolved once to what loads here: a
    registry URI, looked up in the tracking store the stage's own run uses, to its downloaded
    directory. config.yaml keeps the URI; the manifest adds its version."""
    out = Path(config.out).resolve()
    store = tracking_uri(out.parent)
    model = local_model(config.model.name, store)
    config = replace(config, out=str(out), data=str(Path(config.data).resolve()) if config.data else "",
                     model=replace(config.model, name=model.name))
    reference = getattr(config, "method_args", {}).get("reference")
    if not isinstance(reference, str) or reference == "vanilla":
        return config, StageModels(model)
    reference = local_model(reference, store)
    return replace(config, method_args=config.method_args | {"reference": reference.name}), StageModels(model, reference)


def _manifest(stage: str, config, models: StageModels, started: float, run_id: str) -> dict:
    import deepspeed
    import torch
    import transformers

    return {
        "stage": stage,
        "seed": getattr(getattr(config, "train", None), "seed", None),
        "data": str(Path(config.data).resolve()),
        "data_hash": data_hash(config.data),
        "git_sha": git_sha(),
        "versions": {
            "offside": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        },
        **_model_manifest(config, models),
        "mlflow_run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_time_s": round(time.time() - started, 3),
    }


def _model_manifest(config, models: StageModels) -> dict:
    """The model a stage started from and how it ran: path, revision, content hash, registry URI and
    version (a reference model's too), dtype, device type, world size and ZeRO stage."""
    import torch.distributed as dist

    train = getattr(config, "train", None)
    return {**model_provenance(models.model.path), **models.manifest(), "dtype": resolved_dtype(models.spec(config.model)),
            "device": resolve_device(config.model.device).type,
            "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            "zero_stage": train.zero_stage if train else None}
