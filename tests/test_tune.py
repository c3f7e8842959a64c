"""Ray Tune sweeps on a real local Ray: each trial a Ray Train run of DeepSpeed workers, MLflow
parent + one child per trial, best config and model exported; bad configs fail before any trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler

from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec, evaluate
from offside.models.loading import ModelSpec, build_or_load
from offside.registry import resolve
from tune_jobs.search import BestSoFarASHA, ShuffledGrid, replay
from tune_jobs.space import estimate
from tune_jobs.spec import load_sweep, sweep_from_dict
from tune_jobs.state import GOOD_SNAPSHOT
from tune_jobs.sweep import export_model, run_sweep
from tune_jobs.tracking import SWEEP_TAG, TRIAL_TAG


def sweep_dict(tmp_path, data, vanilla, **extra):
    base = {
        "name": "s", "storage": str(tmp_path / "tune"), "data": str(data), "vanilla": str(vanilla), "methods": ["ga"],
        "train": {"epochs": 2, "lr": 4e-4, "batch_size": 8, "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0},
        "search_space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}, "num_samples": 4,
        "resources": {"workers": 2, "cpus_per_worker": 1, "max_concurrent": 1, "local_cpus": 4},
        "epoch_eval": {"splits": ["forget", "retain", "test"], "forms": ["mcq"], "limit": 6},
    }
    return base | extra


def test_export_refuses_a_checkpoint_whose_latest_epoch_is_missing(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "latest").write_text("epoch-001")
    row = {"checkpoint_path": str(tmp_path / "checkpoint"), "trial_id": "t0", "settings": {}}
    with pytest.raises(OffsideError, match="names epoch 'epoch-001' as latest but holds no such epoch"):
        export_model(row, sweep_from_dict(sweep_dict(tmp_path, "d", "v"), "s.yaml"), tmp_path / "best_model")
    assert not (tmp_path / "best_model").exists()


def sweep_runs(storage: Path, name: str):
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("offside")
    return client, client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'") if experiment else []


@pytest.mark.parametrize("change, message", [
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"search_space": {}}, "'search_space' is empty"),
    ({"search_space": {"train.lr": {"choice": []}}}, "needs a non-empty list"),
    ({"objective": {"metric": "forget/image/all/bleu"}}, "no suite produces metric 'forget/image/all/bleu'"),
    ({"epoch_eval": {"splits": ["forget"], "forms": ["mcq"]}}, "no suite produces metric 'summary/forget_efficacy'"),
    ({"search": "grid"}, "grid search needs explicit values"),
    ({"train": {"epochs": 2, "bogus": 1}}, "unknown key 'train.bogus'"),
])
def test_bad_config_is_refused_naming_the_problem(tmp_path, change, message):
    with pytest.raises(OffsideError, match=message.replace("(", r"\(")):
        sweep_from_dict(sweep_dict(tmp_path, "d", "v") | change, "bad.yaml")


def test_shipped_configs_load():
    for path in sorted(Path("tune_jobs/configs").glob("*.yaml")):
        config = load_sweep(path)
        assert config.search_space and config.methods, path


def test_grid_runs_every_point_once_in_a_seeded_shuffled_order(tmp_path):
    values = {"method": ["ga", "gd", "npo"], "train.lr": [1e-4, 1e-3], "lora.target_modules": [["q_proj"], ["q_proj", "v_proj"]]}
    listed = [{"method": m, "train.lr": lr, "lora.target_modules": t} for t in values["lora.target_modules"]
              for lr in values["train.lr"] for m in values["method"]]
    searcher = ShuffledGrid(values, seed=0)
    first = [searcher.suggest(f"t{i}") for i in range(5)]
    searcher.save(str(tmp_path / "state.json"))
    restored = ShuffledGrid(values, seed=0)  # what `--resume` rebuilds, then restores
    restored.restore(str(tmp_path / "state.json"))
    rest = [restored.suggest(f"t{i}") for i in range(5, 14)]
    assert rest[-2:] == ["FINISHED", "FINISHED"]
    points = first + rest[:-2]
    assert sorted(map(json.dumps, points)) == sorted(map(json.dumps, listed))  # each point exactly once
    assert points != listed and points == ShuffledGrid(values, seed=0).points != ShuffledGrid(values, seed=1).points


def test_asha_ranks_a_trial_by_its_best_objective_so_far():
    steady, oscillating = [0.30] * 4, [0.40, -9.0, 0.45, 0.50]  # the second dips under the utility bound at epoch 2
    rungs = {"time_attr": "epoch", "max_t": 4, "grace_period": 2, "reduction_factor": 2}
    assert replay(ASHAScheduler(**rungs), [steady, steady, oscillating]) == [4, 4, 2]  # Ray's: stopped at the rung
    assert replay(BestSoFarASHA(**rungs), [steady, steady, oscillating]) == [4, 4, 4]  # its best, 0.40, passes
    assert replay(BestSoFarASHA(**rungs), [steady, steady, [0.20, 0.25, 0.9, 0.9]]) == [4, 4, 2]  # a weak trial still stops


def test_unsatisfiable_resources_fail_before_any_trial(tmp_path, tiny_vanilla, local_ray_env):
    data, vanilla = tiny_vanilla
    config = sweep_from_dict(sweep_dict(tmp_path, data, vanilla, resources={"workers": 8, "local_cpus": 4}))
    with pytest.raises(OffsideError, match="a trial needs 9 CPUs .* the cluster has 4 CPUs"):
        run_sweep(config)
    assert not (tmp_path / "tune" / "s" / "trials").exists()


def test_existing_sweep_name_is_refused_without_resume(tmp_path, tiny_vanilla):
    data, vanilla = tiny_vanilla
    (tmp_path / "tune" / "s").mkdir(parents=True)
    config = sweep_from_dict(sweep_dict(tmp_path, data, vanilla))
    with pytest.raises(OffsideError, match="already exists; continue it with --resume"):
        run_sweep(config)


@pytest.mark.slow  # 2–4 min beside the other worker's tests: it held the default tier over 10 min
def test_two_trial_asha_sweep_of_deepspeed_pairs(tmp_path, tiny_vanilla, local_ray_env, monkeypatch):
    data, vanilla = tiny_vanilla
    config = sweep_from_dict(sweep_dict(tmp_path, data, vanilla, train={"epochs": 3, "lr": 4e-4, "batch_size": 8},
                                        num_samples=2, system_metrics_s=1))
    result = run_sweep(config, verbose=0)
    assert result.complete and len(result.trials) == 2
    assert all(row["status"] == "TERMINATED" for row in result.trials)
    assert all(1 <= row["epochs_run"] <= 3 for row in result.trials)  # ASHA (grace 1, factor 2) may stop a trial after any epoch

    client, runs = sweep_runs(tmp_path / "tune", "s")
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    children = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and parents[0].info.status == "FINISHED"
    for child in children:  # per-epoch metrics, one value per epoch the trial ran
        history = client.get_metric_history(child.info.run_id, "summary/forget_efficacy")
        row = next(r for r in result.trials if r["trial_id"] == child.data.tags[TRIAL_TAG])
        assert sorted(m.step for m in history) == list(range(1, row["epochs_run"] + 1))
        assert child.info.status == ("FINISHED" if row["epochs_run"] == 3 else "KILLED")
        assert child.data.tags["offside.attempts"] == "1"
        for rank in (0, 1):  # each training rank's system metrics, under its own node id
            assert {f"system/rank{rank}/cpu_utilization_percentage", f"system/rank{rank}/system_memory_usage_megabytes"} <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"best.yaml", "results.csv", "results.md", "pareto.png"} <= artifacts

    best = yaml.safe_load((result.sweep_dir / "best.yaml").read_text())
    assert best["objective"] == max(row["objective"] for row in result.trials)
    # The space estimated before the first trial is what a checkpoint takes (besides the weights and
    # optimizer moments, a few kB of random and method state).
    size = sum(p.stat().st_size for p in Path(best["checkpoint"]).rglob("*") if p.is_file())
    assert estimate(config).checkpoint == pytest.approx(size, rel=0.02)
    assert best["settings"]["train"]["lr"] == pytest.approx(best["sample"]["train.lr"])
    version = client.get_model_version_by_alias("offside-s", "best")  # the sweep registered its best model
    assert parents[0].data.tags["registered_model"] == "models:/offside-s/1" and str(version.version) == "1"
    assert version.run_id == parents[0].info.run_id == version.tags["parent_run"]
    assert (version.tags["method"], float(version.tags["objective"])) == (best["settings"]["method"], best["objective"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'tune' / 'mlflow.db'}")
    model, processor = build_or_load(ModelSpec(str(resolve("models:/offside-s@best"))))  # scored below: the best epoch's weights
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise

    bench = load_benchmark(data)
    spec = EvalSpec(splits=["forget"], forms=["mcq"], limit=6)
    metrics, _ = evaluate(model, processor, {"forget": materialise(bench["forget"])}, spec, progress=False)
    # The exported model is the best epoch's weights: it reproduces that epoch's reported accuracy.
    assert metrics["forget/image/all/mcq_acc"] == pytest.approx(best_row(result, best)["forget/image/all/mcq_acc"])


def best_row(result, best):
    return next(r for r in result.trials if r["trial_id"] == best["trial_id"])


def _cli(config_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "offside.cli", "tune", *extra] + (["--config", str(config_path)] if config_path else []),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _json_or_none(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:  # empty, or being written
        return {}


def _wait_for(condition, timeout: float, proc: subprocess.Popen):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.3)
    raise AssertionError("timed out waiting")


@pytest.mark.slow
def test_killed_worker_resumes_its_trial_from_the_checkpoint(tmp_path, tiny_vanilla, local_ray_env):
    data, vanilla = tiny_vanilla
    config = sweep_dict(tmp_path, data, vanilla, num_samples=1, scheduler={"name": "fifo"},
                        train={"epochs": 4, "lr": 4e-4, "batch_size": 8})
    path = tmp_path / "fault.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _cli(path)
    workers = tmp_path / "tune" / "s" / "workers"

    def rank1_training_after_a_committed_epoch():
        # An epoch is committed once Train has registered its checkpoint (the snapshot's latest); that
        # can lag the ranks by an epoch. The victim must still have an epoch to train: killed after its
        # last one, it would end no attempt.
        files = list(workers.glob("*/rank1.json"))
        record = json.loads(files[0].read_text()) if files else {}
        snapshots = list((tmp_path / "tune" / "s" / "trials").glob(f"*/{GOOD_SNAPSHOT}"))
        latest = (_json_or_none(snapshots[0].read_text()).get("latest_checkpoint_result") or {}) if snapshots else {}
        committed = latest.get("metrics", {}).get("epoch", 0)
        return {**record, "committed": committed} if committed >= 1 and 1 <= record.get("epoch", 0) < 4 else None

    victim = _wait_for(rank1_training_after_a_committed_epoch, 900, proc)
    os.kill(victim["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]

    client, runs = sweep_runs(tmp_path / "tune", "s")
    children = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    epochs = sorted(m.step for m in client.get_metric_history(children[0].info.run_id, "epoch"))
    assert epochs == [1, 2, 3, 4]  # the counter continued after the restart; each epoch once under the plain keys
    tags = children[0].data.tags
    started = int(tags["offside.attempt.2"].split(",")[0].removeprefix("from epoch "))
    assert tags["offside.attempts"] == "2" and started >= victim["committed"]  # the new workers started from the checkpoint
    # Epochs the first attempt logged past that checkpoint were run again: logged apart, as attempt2/…
    rerun = sorted(m.step for m in client.get_metric_history(children[0].info.run_id, "attempt2/epoch"))
    first_logged = max(rerun, default=started)
    assert rerun == list(range(started + 1, first_logged + 1))
    attempts = {m.step: m.value for m in client.get_metric_history(children[0].info.run_id, "attempt")}
    assert attempts == {e: (1 if e <= first_logged else 2) for e in range(1, 5)}  # who logged each plain epoch
    record = json.loads(next(workers.glob("*/rank1.json")).read_text())
    assert record["pid"] != victim["pid"] and record["epoch"] == 4


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_vanilla, local_ray_env):
    data, vanilla = tiny_vanilla
    grid = [1e-4, 1e-3]
    config = sweep_dict(tmp_path, data, vanilla, search="grid", search_space={"train.lr": {"grid": grid}}, scheduler={"name": "fifo"},
                        resources={"workers": 1, "max_concurrent": 1, "local_cpus": 4})
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _cli(path)

    def finished_children():
        try:
            return [r for r in sweep_runs(tmp_path / "tune", "s")[1] if TRIAL_TAG in r.data.tags and r.info.status == "FINISHED"]
        except Exception:  # the store is being created
            return []

    first = _wait_for(finished_children, 900, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "sweep interrupted; continue it with: offside tune --resume" in out, out[-3000:]
    _, runs = sweep_runs(tmp_path / "tune", "s")
    assert {r.info.status for r in runs if r.data.tags.get("stage") == "sweep"} == {"KILLED"}
    assert "RUNNING" not in {r.info.status for r in runs}

    refused = _cli(path)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "already exists" in out

    resumed = _cli(None, "--resume", str(tmp_path / "tune" / "s"))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    client, runs = sweep_runs(tmp_path / "tune", "s")
    children = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(float(r.data.params["train.lr"]) for r in children) == grid  # each grid point once, none repeated
    for done in first:  # finished before the interruption: not run again
        again = next(r for r in children if r.info.run_id == done.info.run_id)
        assert again.info.end_time == done.info.end_time
        assert len(client.get_metric_history(done.info.run_id, "epoch")) == 2
    assert (tmp_path / "tune" / "s" / "best.yaml").exists()
