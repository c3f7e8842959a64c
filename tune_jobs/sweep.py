"""`offside tune`: a Ray Tune sweep of unlearning trials (tune_jobs.trial), tracked in MLflow.

Sweep directory `<storage>/<name>/`: Tune's experiment state, `sweep.yaml` (the resolved config, what
`--resume` reads), `vanilla_metrics.json`, `vanilla_check.json` (offside/eval/sanity.py: has the vanilla
model learned the benchmark? warned on stderr when not), `trials/` (each trial's Ray Train run and checkpoints),
`workers/` (pid + epoch per trial rank), and at the end `results.csv`, `results.md`, `pareto.png`,
`best.yaml` and `best_model/` (the best checkpoint exported as a loadable model directory). MLflow:
`<storage>/mlflow.db` unless MLFLOW_TRACKING_URI is set.

Before the first trial the sweep checks that its storage has room for its checkpoints (tune_jobs/space.py);
its state survives a full disk (tune_jobs/state.py); it ends finished, interrupted or failed, naming the
failed trials and whether `--resume` can help (tune_jobs/outcome.py)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from offside.config import from_dict, to_dict
from offside.data.loader import data_hash, load_benchmark
from offside.data.rows import materialise
from offside.errors import OffsideError
from offside.eval.evaluate import evaluate
from offside.eval.sanity import checked
from offside.models.loading import LoraSpec, ModelSpec, build_or_load, is_model_dir, save
from offside.registry import SWEEP_ALIAS, Objective, register
from offside.tracking import tracking_uri
from tune_jobs import tracking
from tune_jobs.outcome import TrialFailure, trial_failure
from tune_jobs.space import check_space
from tune_jobs.spec import SweepConfig, apply_sample, max_epochs, sweep_from_dict, trial_count
from tune_jobs.state import keep_state_callback, recover_experiment_state, saved_statuses, write_atomically

SWEEP_FILE = "sweep.yaml"
FINISHED_STATES = ("TERMINATED", "ERROR")


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run: str
    trials: list[dict]  # one row per trial: its best epoch's metrics, settings, checkpoint
    best: dict | None
    complete: bool
    interrupted: bool = False  # Ctrl+C (or SIGTERM): trials were left unfinished
    failed: list[TrialFailure] = field(default_factory=list)  # trials that errored after their retries


def run_sweep(config: SweepConfig | None = None, address: str | None = None, resume: str | None = None,
              verbose: int = 1, require_space: bool = False) -> SweepResult:
    """Runs (or with `resume`, continues) a sweep; `require_space` refuses to start when the storage
    has less free space than its checkpoints need (otherwise a warning)."""
    config, sweep_dir = _prepare(config, resume)
    check_space(config, sweep_dir, require_space)
    import ray

    started = _start_ray(address, config)
    try:
        check_resources(config)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_atomically(sweep_dir / SWEEP_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
        uri = tracking_uri(Path(config.storage))
        parent = tracking.parent_run(uri, config.name, to_dict(config))
        static = _static(config, sweep_dir, uri, parent, _vanilla_metrics(config, sweep_dir))
        grid, trials = _fit(_tuner(config, sweep_dir, static, resume is not None, verbose))
        return _finish(config, sweep_dir, uri, parent, grid, trials, static)
    except BaseException as err:
        if "parent" in locals():  # an interrupt KILLED, any other error FAILED (--resume reopens it)
            tracking.mark_parent(uri, parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()


def _prepare(config: SweepConfig | None, resume: str | None) -> tuple[SweepConfig, Path]:
    if resume:
        sweep_dir = Path(resume).resolve()
        saved = sweep_dir / SWEEP_FILE
        if not saved.exists():
            raise OffsideError(f"{sweep_dir}: not a sweep directory (no {SWEEP_FILE}); nothing to resume")
        # The sweep lives in <storage>/<name>: where it is now, should it have been moved (say, off a full disk).
        return replace(sweep_from_dict(yaml.safe_load(saved.read_text()), str(saved)), storage=str(sweep_dir.parent)), sweep_dir
    if config is None:
        raise OffsideError("a sweep config is required (--config)")
    config = replace(config, storage=str(Path(config.storage).resolve()), data=str(Path(config.data).resolve()),
                     vanilla=str(Path(config.vanilla).resolve()) if Path(config.vanilla).exists() else config.vanilla)
    sweep_dir = Path(config.storage) / config.name
    if sweep_dir.exists():
        raise OffsideError(f"{sweep_dir}: a sweep named {config.name!r} already exists; continue it with "
                           f"--resume {sweep_dir}, or choose another name")
    if not Path(config.data).is_dir():
        raise OffsideError(f"data: {config.data}: benchmark directory not found")
    if not is_model_dir(Path(config.vanilla)):
        raise OffsideError(f"vanilla: {config.vanilla}: not a model directory (no config.json) nor an adapter directory")
    return config, sweep_dir


def _start_ray(address: str | None, config: SweepConfig) -> bool:
    """Joins `address` (an existing cluster) or starts a local Ray in this process; True if started
    here (and so to be shut down here)."""
    import ray

    if ray.is_initialized():
        return False
    # A trial's worker group waits for its resources while other trials hold them (Train's default: 60 s).
    runtime_env = {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1800"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return True
    # Ray Train's placement-group cleaner finds its cluster by auto-detection, which fails when other
    # Ray instances run on the machine (it then leaks the worker group of every trial ASHA stops):
    # fix the GCS port and hand the address to every Ray process through the environment.
    from ray._private.services import get_node_ip_address

    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    try:
        ray.init(address="local", num_cpus=config.resources.local_cpus, include_dashboard=True, runtime_env=runtime_env,
                 dashboard_host="127.0.0.1", dashboard_port=_free_port(), log_to_driver=False)
    finally:
        # Only the Ray processes started above keep them; a later ray.init() here must not join a dead cluster.
        os.environ.pop("RAY_GCS_SERVER_PORT")
        os.environ.pop("RAY_ADDRESS")
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_resources(config: SweepConfig) -> None:
    """Fails before any trial when one trial (its 1-CPU driver + every worker) can never be placed."""
    import ray

    res = config.resources
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need_cpu = 1 + res.workers * res.cpus_per_worker
    need_gpu = res.workers * res.gpus_per_worker
    fits_one_worker = any(n.get("CPU", 0) >= res.cpus_per_worker and n.get("GPU", 0) >= res.gpus_per_worker for n in nodes)
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0) or not fits_one_worker:
        raise OffsideError(
            f"resources: a trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs (1 driver + {res.workers} workers × "
            f"{res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU), the cluster has {total.get('CPU', 0):g} CPUs "
            f"and {total.get('GPU', 0):g} GPUs: it can never be scheduled")


def _vanilla_metrics(config: SweepConfig, sweep_dir: Path) -> dict[str, float]:
    """The vanilla model's scores on the per-epoch suites (the summary's reference), computed once,
    with the vanilla check."""
    path = sweep_dir / "vanilla_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    bench = load_benchmark(config.data)
    model, processor = build_or_load(ModelSpec(config.vanilla, dtype=config.dtype, device=config.device))
    check = checked(model, processor, bench, config.vanilla)
    write_atomically(sweep_dir / "vanilla_check.json", json.dumps(check, indent=2) + "\n")
    rows = {s: materialise(bench[s]) for s in config.epoch_eval.splits}
    metrics, _ = evaluate(model, processor, rows, config.epoch_eval, progress=False)
    write_atomically(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics



def _static(config: SweepConfig, sweep_dir: Path, uri: str, parent: str, vanilla_metrics: dict) -> dict:
    """What every trial shares (passed to the trainable with tune.with_parameters)."""
    base = {"method": config.methods[0], "method_args": dict(config.method_args), "train": to_dict(config.train),
            "lora": to_dict(config.lora) if config.lora else None, "forget_fraction": config.forget_fraction}
    return {
        "sweep": config.name, "sweep_dir": str(sweep_dir), "train_storage": str(sweep_dir / "trials"),
        "tracking_uri": uri, "parent_run": parent, "data": config.data, "vanilla": config.vanilla,
        "dtype": config.dtype, "scenario": config.scenario, "modalities": ["image", "text"], "freeze_vision": config.freeze_vision,
        "base": base, "epoch_eval": to_dict(config.epoch_eval), "objective": to_dict(config.objective),
        "resources": to_dict(config.resources), "max_failures": config.max_failures,
        "system_metrics_s": config.system_metrics_s, "vanilla_metrics": vanilla_metrics,
    }


def dimensions(config: SweepConfig) -> dict[str, dict]:
    """The search space's dotted keys and distributions, with the methods as a dimension when several are listed."""
    space = dict(config.search_space)
    if len(config.methods) > 1 and "method" not in space:
        space["method"] = {"choice": list(config.methods)}
    return space


def search_space(config: SweepConfig) -> dict:
    """Tune's param_space for random and Optuna search; a grid's points come from its searcher."""
    from ray import tune

    if config.search == "grid":
        return {}
    makers = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
              "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: makers[kind](values) for key, dist in dimensions(config).items() for kind, values in dist.items()}


def _tuner(config: SweepConfig, sweep_dir: Path, static: dict, resume: bool, verbose: int):
    from ray import tune

    from tune_jobs.trial import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, static=static), {"cpu": 1})
    if resume:
        if not tune.Tuner.can_restore(str(sweep_dir)):
            raise OffsideError(f"{sweep_dir}: no Tune experiment state to resume (the sweep never started a trial)")
        recovered = recover_experiment_state(sweep_dir)
        if recovered:
            print(f"[offside] {recovered}", flush=True)
        # Errored trials are retried: each resumes its Train run from the run's last checkpoint.
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    callback = tracking.closing_callback(config.name, planned_epochs(config))
    # Multi-objective: the searcher and scheduler name their metrics themselves, TuneConfig none.
    single = {} if config.objective.mode == "pareto" else {"metric": "objective", "mode": "max"}
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(num_samples=trial_count(config),
                                    max_concurrent_trials=config.resources.max_concurrent,
                                    search_alg=_searcher(config), scheduler=make_scheduler(config), **single),
        run_config=tune.RunConfig(name=config.name, storage_path=config.storage, callbacks=[callback, keep_state_callback()],
                                  failure_config=tune.FailureConfig(max_failures=config.trial_max_failures),
                                  verbose=verbose),
    )


def planned_epochs(config: SweepConfig):
    """A trial's planned epochs from its sampled config (train.epochs may be searched)."""
    base = config.train.epochs
    return lambda trial_config: int(trial_config.get("train.epochs", base))


def make_scheduler(config: SweepConfig):
    """FIFO, or ASHA on the epoch counter ranking trials by their best objective so far. Its metric
    comes from TuneConfig, except in Pareto mode, where TuneConfig names none."""
    from ray.tune.schedulers import FIFOScheduler

    from tune_jobs.search import BestSoFarASHA

    if config.scheduler.name != "asha":
        return FIFOScheduler()
    return BestSoFarASHA(time_attr="epoch", max_t=max_epochs(config), grace_period=config.scheduler.grace_period,
                         reduction_factor=config.scheduler.reduction_factor,
                         **({"metric": "objective", "mode": "max"} if config.objective.mode == "pareto" else {}))


def _searcher(config: SweepConfig):
    """Random, shuffled grid or Optuna TPE; multi-objective Optuna gets both metrics itself."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tune_jobs.search import ShuffledGrid

    if config.search == "grid":
        return ShuffledGrid({key: values for key, dist in dimensions(config).items() for values in dist.values()}, config.seed)
    if config.search == "random":
        # max_concurrent here: Tune ignores max_concurrent_trials for a BasicVariantGenerator instance.
        return BasicVariantGenerator(random_state=config.seed, max_concurrent=config.resources.max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=config.seed)
    if config.objective.mode == "pareto":
        return OptunaSearch(metric=[config.objective.metric, config.objective.constraint], mode=["max", "max"], sampler=sampler)
    return OptunaSearch(sampler=sampler)


def _fit(tuner) -> tuple[object | None, list]:
    """Runs the sweep: (its ResultGrid, its trials). Building the grid reads each failed trial's pickled
    error from the storage, which a full disk can leave truncated: then the grid is None (a sweep with
    a failed trial needs only its trials)."""
    try:
        grid = tuner.fit()
        return grid, grid._experiment_analysis.trials
    except Exception:
        analysis = tuner._local_tuner._experiment_analysis  # set before the grid is built
        if analysis is None or not any(t.status == "ERROR" for t in analysis.trials):
            raise
        return None, analysis.trials


def _finish(config: SweepConfig, sweep_dir: Path, uri: str, parent: str, grid, trials: list, static: dict) -> SweepResult:
    client = tracking.MlflowClient(uri)
    tracking.deliver_spilled(uri, sweep_dir)
    tracking.settle_trial_runs(uri, config.name, {t.trial_id: tracking.trial_run_status(t, planned_epochs(config)) for t in trials})
    # Only an interrupt ends Tune with trials unfinished (or not yet made). Their statuses are read from
    # the state Tune saved as it stopped: afterwards it marks every trial it stops TERMINATED.
    if len(trials) < trial_count(config) or any(s not in FINISHED_STATES for s in saved_statuses(trials)):
        client.set_terminated(parent, "KILLED")
        return SweepResult(sweep_dir, parent, [], None, False, interrupted=True)
    failed = [trial_failure(t) for t in trials if t.status == "ERROR"]
    if failed:
        client.set_terminated(parent, "FAILED")
        return SweepResult(sweep_dir, parent, [], None, False, failed=failed)
    rows = trial_rows(grid, static)
    if not rows:
        client.set_terminated(parent, "FAILED")
        raise OffsideError(f"sweep {config.name!r}: no trial reported a result (see {sweep_dir}/*/error.txt)")
    best = max(rows, key=lambda r: r["objective"])
    write_results(config, sweep_dir, rows, best)
    if config.export_best:
        export_model(best, config, sweep_dir / "best_model")
        client.set_tag(parent, "best_model", str(sweep_dir / "best_model"))
        if config.register:
            _register_best(config, sweep_dir / "best_model", client, parent, best)
    client.set_tag(parent, "best_checkpoint", best["checkpoint_path"])
    client.set_tag(parent, "best_trial", best["trial_id"])
    client.log_batch(parent, metrics=[tracking.Metric(f"best/{k}", float(best[k]), 0, 0) for k in
                                      ("objective", config.objective.metric, config.objective.constraint)])
    for name in ("results.csv", "results.md", "pareto.png", "best.yaml"):
        client.log_artifact(parent, str(sweep_dir / name))
    client.set_terminated(parent, "FINISHED")
    return SweepResult(sweep_dir, parent, rows, best, True)


def _register_best(config: SweepConfig, model_dir: Path, client, parent: str, best: dict) -> None:
    """The sweep's pick as a version of offside-<name> with alias `best`; `champion` moves to it only if
    it beats the champion on the same objective (offside/registry.py)."""
    name, spec = f"offside-{config.name}", config.objective
    tags = {"method": best["settings"]["method"], "scenario": config.scenario, "data_hash": data_hash(config.data),
            "parent_run": parent, "trial": best["trial_id"], "epoch": best["epoch"]}
    measured = (f"{spec.metric} subject to {spec.constraint} >= {spec.min_value}" if spec.mode == "constrained"
                else f"{spec.metric} (pareto with {spec.constraint})")
    metrics = {"objective": best["objective"], spec.metric: best[spec.metric], spec.constraint: best[spec.constraint]}
    registered = register(model_dir, name, client, parent, tags, metrics, Objective(measured, best["objective"]), (SWEEP_ALIAS,))
    client.set_tag(parent, "registered_model", f"models:/{name}/{registered.version}")
    print(f"[offside] registered {registered}", flush=True)


def trial_rows(grid, static: dict) -> list[dict]:
    """Each trial's best epoch (by objective, ties → the later epoch) among those whose checkpoint
    Ray Train kept (the best-scoring and the latest): its metrics, settings and checkpoint."""
    trials = {t.trial_id: t for t in grid._experiment_analysis.trials}
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or "objective" not in frame:
            continue
        records = [r for r in frame.to_dict("records") if r.get("objective") == r.get("objective")
                   and r.get("checkpoint_path") and Path(r["checkpoint_path"]).exists()]
        if not records:
            continue
        record = max(records, key=lambda r: (r["objective"], r["epoch"]))
        trial = trials[record["trial_id"]]
        sample = dict(trial.config)
        rows.append({
            "trial_id": record["trial_id"], "status": trial.status, "sample": sample,
            "settings": apply_sample(static["base"], sample), "epoch": int(record["epoch"]),
            "epochs_run": int(frame["epoch"].max()), "checkpoint_path": record["checkpoint_path"],
            **{k: float(v) for k, v in record.items() if "/" in k and not k.startswith("config/") and isinstance(v, (int, float))},
            "objective": float(record["objective"]),
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def pareto_front(rows: list[dict], a: str, b: str) -> list[dict]:
    return [r for r in rows if not any(o[a] >= r[a] and o[b] >= r[b] and (o[a] > r[a] or o[b] > r[b]) for o in rows)]


def write_results(config: SweepConfig, sweep_dir: Path, rows: list[dict], best: dict) -> None:
    a, b = config.objective.metric, config.objective.constraint
    front = {r["trial_id"] for r in pareto_front(rows, a, b)}
    columns = ["trial_id", "status", "epochs_run", "epoch", "objective", a, b]
    sample_keys = sorted({k for r in rows for k in r["sample"]})
    lines = [",".join(columns + sample_keys + ["pareto"])]
    table = ["| " + " | ".join(columns + sample_keys + ["pareto"]) + " |", "|" + "---|" * (len(columns) + len(sample_keys) + 1)]
    for r in rows:
        cells = [_cell(r[c]) for c in columns] + [_cell(r["sample"].get(k)) for k in sample_keys] + [str(r["trial_id"] in front)]
        lines.append(",".join(cells))
        table.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "results.csv").write_text("\n".join(lines) + "\n")
    (sweep_dir / "results.md").write_text("\n".join(table) + "\n")
    best_doc = {"sweep": config.name, "trial_id": best["trial_id"], "epoch": best["epoch"], "sample": best["sample"],
                "settings": best["settings"], "objective": best["objective"], "metrics": {a: best[a], b: best[b]},
                "checkpoint": best["checkpoint_path"], "model": str(sweep_dir / "best_model") if config.export_best else None}
    (sweep_dir / "best.yaml").write_text(yaml.safe_dump(best_doc, sort_keys=False))
    _plot(rows, front, a, b, sweep_dir / "pareto.png")


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plot(rows: list[dict], front: set[str], a: str, b: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for on_front in (False, True):
        chosen = [r for r in rows if (r["trial_id"] in front) == on_front]
        ax.scatter([r[a] for r in chosen], [r[b] for r in chosen], label="Pareto front" if on_front else "trials",
                   color="tab:red" if on_front else "tab:gray")
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_trained(model, weights: dict, trial_id: str) -> None:
    """A checkpoint holds what trained (with LoRA, the adapters: the engine leaves frozen weights out),
    so the model's frozen weights stay as loaded and every trained one must come from the checkpoint."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    absent = sorted(set(missing) & trained)
    if unexpected or absent:
        raise OffsideError(f"trial {trial_id}: its checkpoint does not match the model it rebuilt "
                           f"(missing trained weights {absent[:3]}, unexpected {sorted(unexpected)[:3]})")


def checkpoint_weights(checkpoint: Path, tag: str) -> dict:
    """The module's weights in a DeepSpeed checkpoint of any ZeRO stage. Stages 1–3 keep the fp32
    master weights partitioned across the ranks' `zero_pp_rank_*` files (ZeRO-3 the module too), which
    DeepSpeed's consolidation gathers, on the CPU, without a process group; stage 0 keeps one whole copy."""
    if any((checkpoint / tag).glob("*zero_pp_rank_*_optim_states.pt")):  # bf16_zero_pp_… under bf16
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    import torch

    return torch.load(checkpoint / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def export_model(row: dict, config: SweepConfig, out: Path) -> Path:
    """Rebuilds the trial's model (vanilla + its LoRA settings) and loads the weights of its best
    epoch's DeepSpeed checkpoint; saves what loads by path (with LoRA, the adapter on the vanilla model)."""
    checkpoint = Path(row["checkpoint_path"] or "")
    latest = checkpoint / "latest"
    if not latest.exists():
        raise OffsideError(f"trial {row['trial_id']}: its best checkpoint {checkpoint} is gone or not a DeepSpeed checkpoint")
    tag = latest.read_text().strip()
    if not (checkpoint / tag).is_dir():
        raise OffsideError(f"trial {row['trial_id']}: its best checkpoint {checkpoint} names epoch {tag!r} as latest but holds no such epoch")
    settings = row["settings"]
    lora = from_dict(LoraSpec, settings["lora"]) if settings.get("lora") else None
    model, processor = build_or_load(ModelSpec(config.vanilla, dtype=config.dtype, device=config.device,
                                               freeze_vision=config.freeze_vision, lora=lora))  # as the trial built it
    load_trained(model, checkpoint_weights(checkpoint, tag), row["trial_id"])
    tmp = out.parent / f".{out.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    save(model, processor, tmp)
    (tmp / "trial.json").write_text(json.dumps({k: row[k] for k in ("trial_id", "epoch", "objective", "settings")}, indent=2) + "\n")
    # The provenance files an `offside unlearn` directory has, so `offside report` reads the
    # method, scenario and seed of an exported model like any other.
    provenance = {"data": config.data, "model": {"name": config.vanilla}, "scenario": config.scenario, **settings}
    (tmp / "config.yaml").write_text(yaml.safe_dump(provenance, sort_keys=False))
    (tmp / "manifest.json").write_text(json.dumps({"stage": "unlearn", "seed": settings["train"]["seed"],
                                                   "sweep": config.name, "trial_id": row["trial_id"], "epoch": row["epoch"]},
                                                  indent=2) + "\n")
    tmp.rename(out)
    return out
