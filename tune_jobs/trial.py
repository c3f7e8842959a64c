"""One trial = one distributed DeepSpeed run. `run_trial` is the Tune function trainable (the trial's
driver, 1 CPU): it opens the trial's MLflow child run and runs a Ray Train `TorchTrainer` whose workers
(`train_worker`) run the project's engine. Ray creates the process group (gloo on CPU, nccl on GPU)
and the engine joins it. Every epoch each rank evaluates, saves its DeepSpeed checkpoint shard and
reports it; rank 0's metrics reach Tune through `TuneReportCallback` and, asynchronously, the trial's
MLflow run (tune_jobs.tracking: each start of the workers is an attempt; every rank logs its system
metrics). The Train run is named (sweep, trial id), so a restarted worker group or trial resumes from
the last reported checkpoint; its checkpoint manager snapshot is kept readable (tune_jobs.state)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from offside.config import from_dict
from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.data.scenarios import forget_share, select
from offside.engine.trainer import TrainSpec, train
from offside.eval.evaluate import EvalSpec, evaluate
from offside.eval.summary import summary_scores
from offside.models.loading import LoraSpec, ModelSpec, build_or_load
from offside.stages import training_rows
from offside.unlearn import get_method
from tune_jobs import tracking
from tune_jobs.state import recover_snapshot, snapshot_callback
from tune_jobs.spec import SUMMARY_METRICS, ObjectiveSpec, apply_sample, objective_value, produced_metrics


def run_trial(sample: dict, static: dict) -> None:
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    settings = apply_sample(static["base"], sample)
    run_id, run_start_ms = tracking.child_run(
        static["tracking_uri"], static["parent_run"], static["sweep"], trial_id, {"sample": sample, **settings},
        {"stage": "unlearn", "method": settings["method"], "scenario": static["scenario"]},
    )
    name = f"{static['sweep']}-{trial_id}"
    for line in recover_snapshot(Path(static["train_storage"]) / name):
        print(f"[offside] trial {trial_id}: {line}", flush=True)
    res = static["resources"]
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if res["gpus_per_worker"] else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**static, "settings": settings, "run_id": run_id, "run_start_ms": run_start_ms, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=bool(res["gpus_per_worker"]),
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=static["train_storage"],
            callbacks=[snapshot_callback(Path(static["train_storage"]) / name), TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=static["max_failures"]),
            # Keeps the best-scoring epoch (exported at the end) besides the latest (for resumption).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="objective",
                                                         checkpoint_score_order="max"),
        ),
    )
    trainer.fit()


def train_worker(cfg: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    rank = ray.train.get_context().get_world_rank()
    settings = cfg["settings"]
    spec = from_dict(TrainSpec, settings["train"], "trial train")
    method = get_method(settings["method"], settings["method_args"])
    bench = load_benchmark(cfg["data"])
    forget, retain = select(bench, cfg["scenario"])
    forget = forget_share(forget, settings["forget_fraction"], spec.seed)
    streams = {"forget": training_rows(materialise(forget), cfg["modalities"]),
               "retain": training_rows(materialise(retain), cfg["modalities"])}
    lora = from_dict(LoraSpec, settings["lora"], "trial lora") if settings.get("lora") else None
    model, processor = build_or_load(ModelSpec(cfg["vanilla"], dtype=cfg["dtype"], freeze_vision=cfg["freeze_vision"], lora=lora),
                                     seed=spec.seed, train=spec)  # ZeRO-3: loaded partitioned
    eval_spec = from_dict(EvalSpec, cfg["epoch_eval"], "epoch_eval")
    eval_rows = {s: materialise(bench[s]) for s in eval_spec.splits}
    objective = from_dict(ObjectiveSpec, cfg["objective"], "objective")
    with_summary = set(SUMMARY_METRICS) <= produced_metrics(eval_spec)

    local = Path(tempfile.mkdtemp(prefix=f"offside-{cfg['trial_id']}-rank{rank}-"))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            shutil.copytree(directory, local, dirs_exist_ok=True)
    start_epoch = _checkpoint_epoch(local)
    _record_worker(cfg, rank, start_epoch)
    system = tracking.SystemMetrics(cfg["tracking_uri"], cfg["run_id"], rank, cfg["system_metrics_s"], cfg["run_start_ms"],
                                    _worker_dir(cfg) / f"undelivered-system-rank{rank}-{os.getpid()}.jsonl") if cfg["system_metrics_s"] else None
    if rank == 0:
        attempt = tracking.begin_attempt(_worker_dir(cfg), start_epoch)
        mlflow_log = tracking.MetricLog(cfg["tracking_uri"], cfg["run_id"], _worker_dir(cfg) / f"undelivered-{attempt.number}.jsonl")
        mlflow_log.log({}, 0, tags=attempt.tags())

    def on_epoch(epoch: int, module, logs: dict) -> dict:
        metrics, _ = evaluate(module, processor, eval_rows, eval_spec, progress=False)
        if with_summary:
            metrics.update(summary_scores(metrics, cfg["vanilla_metrics"]))
        metrics.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        metrics["objective"] = objective_value(metrics, objective)
        if rank == 0:  # asynchronous: a tracking server that is down does not hold training up
            mlflow_log.log(attempt.keys(epoch, metrics), step=epoch)
            attempt.logged(epoch)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(local)))
        _record_worker(cfg, rank, epoch)
        return {}

    try:
        train(model, processor, method, streams, spec, local, callbacks=[on_epoch], resume=restored is not None, progress=False)
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if system:
            system.finish()
        if rank == 0:
            mlflow_log.close()


def _checkpoint_epoch(directory: Path) -> int:
    """The epoch a DeepSpeed checkpoint directory holds (its `latest` tag is `epoch-NNN`), 0 if none."""
    latest = directory / "latest"
    return int(latest.read_text().strip().split("-")[-1]) if latest.exists() else 0


def _record_worker(cfg: dict, rank: int, epoch: int) -> None:
    """<sweep dir>/workers/<trial>/rank<r>.json: this worker's pid and last finished epoch, for
    operators (and the fault test) to find a trial's processes."""
    directory = _worker_dir(cfg)
    tmp = directory / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, "node": os.uname().nodename}))
    tmp.replace(directory / f"rank{rank}.json")


def _worker_dir(cfg: dict) -> Path:
    directory = Path(cfg["sweep_dir"]) / "workers" / cfg["trial_id"]
    directory.mkdir(parents=True, exist_ok=True)
    return directory
