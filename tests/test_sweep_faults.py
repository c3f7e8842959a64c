"""Sweeps under faults: a checkpoint volume that fills up, a tracking server that goes away; and the
pieces that make them survivable (last good state, space estimate, verdict)."""

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import start_mlflow
from offside.errors import OffsideError
from test_tune import _cli, sweep_dict
from tune_jobs.outcome import advice, error_line, is_transient, TrialFailure
from tune_jobs.space import check_space, estimate
from tune_jobs.spec import sweep_from_dict
from tune_jobs.state import GOOD_SNAPSHOT, GOOD_STATE, SNAPSHOT, keep_experiment_state, readable, recover_experiment_state, recover_snapshot
from tune_jobs.sweep import checkpoint_weights
from tune_jobs.tracking import SWEEP_TAG, TRIAL_TAG

SESSION, LATER = "2026-01-01_10-00-00", "2026-01-02_09-00-00"


def _tune_files(directory: Path, session: str, trials: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": trials}))
    (directory / f"basic-variant-state-{session}.json").write_text(json.dumps({"counter": len(trials)}))


def test_an_unreadable_experiment_state_falls_back_to_the_last_good_one(tmp_path):
    staging, sweep = tmp_path / "staging", tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "tuner.pkl").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")  # pickle of 1
    _tune_files(staging, SESSION, ["t0", "t1"])
    assert keep_experiment_state(staging, sweep)
    with zipfile.ZipFile(sweep / GOOD_STATE) as archive:
        assert sorted(archive.namelist()) == sorted([f"experiment_state-{SESSION}.json", f"basic-variant-state-{SESSION}.json", "tuner.pkl"])
    _tune_files(staging, SESSION, ["t0", "t1", "t2"])
    (staging / f"experiment_state-{SESSION}.json").write_text('{"trial_data": ["t0", "t')  # as a full disk leaves it
    assert not keep_experiment_state(staging, sweep)  # an unreadable state never replaces a good one

    # The sweep directory as a full disk left it: a later session's state truncated.
    _tune_files(sweep, SESSION, ["t0", "t1"])
    _tune_files(sweep, LATER, ["t0", "t1", "t2"])
    (sweep / f"experiment_state-{LATER}.json").write_text('{"trial_data": ["t0", "t')
    assert recover_experiment_state(sweep).startswith("Tune's state could not be read (experiment_state-2026-01-02_09-00-00.json: JSONDecodeError")
    assert sorted(p.name for p in sweep.glob("experiment_state-*")) == [f"experiment_state-{SESSION}.json"]
    assert json.loads((sweep / f"experiment_state-{SESSION}.json").read_text()) == {"trial_data": ["t0", "t1"]}
    aside = next(sweep.glob(".unreadable-*"))  # nothing deleted: the unreadable files are kept aside
    assert (aside / f"experiment_state-{LATER}.json").read_text() == '{"trial_data": ["t0", "t'
    assert recover_experiment_state(sweep) is None  # readable now: nothing to do

    (sweep / GOOD_STATE).unlink()
    (sweep / f"experiment_state-{SESSION}.json").write_text("{")
    with pytest.raises(OffsideError, match="cannot be read .* no last good state"):
        recover_experiment_state(sweep)


def test_an_unreadable_train_snapshot_is_restored_and_unregistered_uploads_removed(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_partial"):
        (run / name).mkdir(parents=True)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}], "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_b"}}
    (run / ".checkpoint_manager_snapshot.good.json").write_text(json.dumps(snapshot))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot)[:20])
    done = recover_snapshot(run)
    assert "restored its last good version" in done[0] and "checkpoint_partial: never registered" in done[1]
    assert json.loads((run / "checkpoint_manager_snapshot.json").read_text()) == snapshot
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_a", "checkpoint_b"]
    assert recover_snapshot(run) == []


def test_the_verdict_names_the_root_error_and_whether_resume_helps(tmp_path):
    ray_trace = ("Failure # 1\n\x1b[36mray::ImplicitFunc.train()\x1b[39m\nray.train.WorkerGroupError: Training failed due to worker errors:\n"
                 "[Rank 0,1 Error Snippet]:\nOSError: [Errno 28] No space left on device\n")
    assert error_line(ray_trace) == "OSError: [Errno 28] No space left on device"
    full = TrialFailure("a", error_line(ray_trace), is_transient(error_line(ray_trace)))
    bug = TrialFailure("b", "ValueError: lr must be positive", is_transient("ValueError: lr must be positive"))
    died = TrialFailure("c", "ray.exceptions.ActorDiedError: The actor died", True)
    assert full.transient and not bug.transient
    assert advice([full], tmp_path).startswith("the storage is full: free space there")
    assert "retries the failed trials from their last checkpoints once the cause above is gone" in advice([died], tmp_path)
    assert "will recur until that is fixed" in advice([died, bug], tmp_path)


def test_space_needed_by_checkpoints_is_known_before_the_first_trial(tmp_path, tiny_vanilla, capsys):
    data, vanilla = tiny_vanilla
    config = sweep_from_dict(sweep_dict(tmp_path, data, vanilla, num_samples=4, resources={"max_concurrent": 2}))
    found = estimate(config)
    # 1,169,792 trained parameters (the vision tower frozen) × (fp32 weight + Adam's two moments), measured
    # on a real checkpoint as 14,111,573 B; 4 trials × 2 kept + 2 being written, plus the exported model.
    assert found.trained == 1_169_792 and found.checkpoint == 1_169_792 * 12
    assert found.total == 10 * found.checkpoint + 1_777_696 * 4
    lora = sweep_from_dict(sweep_dict(tmp_path, data, vanilla, lora={"r": 8}, search_space={"lora.r": {"choice": [4, 16]}}))
    assert estimate(lora).trained == 2 * 14_336  # the largest rank searched; the adapters only
    huge = sweep_from_dict(sweep_dict(tmp_path, data, vanilla, num_samples=10**7))
    check_space(huge, tmp_path / "tune" / "s", refuse=False)
    assert "warning: sweep 's': its checkpoints need about" in capsys.readouterr().err
    path = _write(tmp_path, sweep_dict(tmp_path, data, vanilla, num_samples=10**7))
    proc = subprocess.run([sys.executable, "-m", "offside.cli", "tune", "--require-space", "--config", path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TiB" in proc.stderr and "free" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "tune" / "s").exists()


def _write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def _children(uri: str, sweep: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("offside").experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    return client, [r for r in runs if TRIAL_TAG in r.data.tags], [r for r in runs if r.data.tags.get("stage") == "sweep"]


@pytest.mark.slow
def test_a_sweep_stopped_by_a_full_disk_resumes_to_completion(tmp_path, tiny_vanilla, local_ray_env, monkeypatch):
    """The tiny sweep's storage on a 24 MiB tmpfs: one checkpoint (14.1 MB) fits, the second epoch's
    does not. Then the volume grows and `--resume` finishes the sweep."""
    from cluster.local import _end_group

    data, vanilla = tiny_vanilla
    (tmp_path / "mlflow").mkdir()
    server, uri = start_mlflow(tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Train takes a worker's report when it polls the workers (every 2 s by default); an epoch of the
    # tiny model is shorter, and a worker that fails before the poll takes its last report loses it
    # (Train restarts from the checkpoint before). Polling more often registers the first epoch first.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    disk = tmp_path / "disk"
    mounted, procs = _mount_tmpfs(disk, "24m"), []
    try:
        if not mounted:
            pytest.skip("mounting a tmpfs was refused (not root): this test needs a small real filesystem")
        config = sweep_dict(tmp_path, data, vanilla, storage=str(disk), num_samples=2, scheduler={"name": "fifo"},
                            resources={"workers": 1, "max_concurrent": 1, "local_cpus": 4}, max_failures=0, trial_max_failures=0)
        procs.append(proc := _cli(Path(_write(tmp_path, config))))
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 1, out[-4000:]
        assert "its checkpoints need about" in out and "has 24.0 MiB free" in out  # warned before the first trial
        assert "sweep failed: 2 trial(s) failed" in out and "No space left on device" in out
        assert "the storage is full: free space there" in out and "interrupted" not in out
        client, children, parents = _children(uri, "s")
        assert parents[0].info.status == "FAILED" and sorted(c.info.status for c in children) == ["FAILED", "FAILED"]
        first = next(c for c in children if client.get_metric_history(c.info.run_id, "epoch"))
        run_dir = disk / "s" / "trials" / f"s-{first.data.tags[TRIAL_TAG]}"
        live = run_dir / SNAPSHOT  # the full disk may have cut it short too: then its last good version counts
        snapshot = live if readable(live) is None else run_dir / GOOD_SNAPSHOT
        registered = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        assert len(checkpoint_weights(run_dir / registered, "epoch-001")) > 0  # the last registered checkpoint loads

        state = max((disk / "s").glob("experiment_state-*.json"))
        try:
            json.loads(state.read_text())  # the full disk usually truncates it, Ray writing it in place;
            state.write_text(state.read_text()[: state.stat().st_size // 2])  # where it did not, cut it as it would
        except ValueError:
            pass

        assert subprocess.run(["mount", "-o", "remount,size=256m", str(disk)]).returncode == 0  # room again
        procs.append(resumed := _cli(None, "--resume", str(disk / "s")))
        out, _ = resumed.communicate(timeout=1200)
        assert resumed.returncode == 0, out[-4000:]
        assert "Tune's state could not be read" in out and "resumed from the last good state" in out
        assert "Restarting experiment" not in out and "params={}" not in out and "[offside] best trial" in out
        results = (disk / "s" / "results.csv").read_text().splitlines()
        header = results[0].split(",")
        rows = [dict(zip(header, line.split(","))) for line in results[1:]]
        assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["epochs_run"] == "2" and float(r["train.lr"]) > 0 for r in rows)
        client, children, parents = _children(uri, "s")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)  # the same runs, reopened
        for child in children:
            history = client.get_metric_history(child.info.run_id, "summary/forget_efficacy")
            assert sorted(m.step for m in history) == [1, 2]  # each epoch once under the plain key
            assert float(child.data.params["train.lr"]) > 0
        assert client.get_run(first.info.run_id).data.tags["offside.attempts"] == "2"
        assert client.get_run(first.info.run_id).data.tags["offside.attempt.2"].startswith("from epoch 1,")
    finally:
        _stop(procs)
        if mounted:
            subprocess.run(["umount", str(disk)])
        _end_group(server)


@pytest.mark.slow
def test_training_goes_on_while_the_tracking_server_is_down(tmp_path, tiny_vanilla, local_ray_env, monkeypatch):
    """A real `mlflow server` stopped after a trial's first epoch and started again two epochs later:
    the epochs in between end while it is down, and every epoch's metrics, and the system metrics
    sampled meanwhile, arrive afterwards (through MLflow's asynchronous queue, or the spill file the
    sweep delivers at its end)."""
    import cluster.local
    from cluster.local import _end_group

    data, vanilla = tiny_vanilla
    (tmp_path / "mlflow").mkdir()
    server, uri = start_mlflow(tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = sweep_dict(tmp_path, data, vanilla, num_samples=1, scheduler={"name": "fifo"}, system_metrics_s=0.5,
                        train={"epochs": 6, "lr": 4e-4, "batch_size": 8}, resources={"workers": 1, "local_cpus": 4})
    workers = tmp_path / "tune" / "s" / "workers"

    def epoch() -> int:
        files = list(workers.glob("*/rank0.json"))
        try:
            return json.loads(files[0].read_text())["epoch"] if files else 0
        except ValueError:
            return 0

    proc = None
    try:
        proc = _cli(Path(_write(tmp_path, config)))
        _wait(lambda: epoch() >= 1, proc)
        down = time.time()
        _end_group(server)
        last = epoch()
        _wait(lambda: epoch() >= last + 2, proc)  # two more epochs end, and reach Tune, with no server
        back = time.time()
        monkeypatch.setattr(cluster.local, "free_port", lambda: int(uri.rsplit(":", 1)[1]))
        server, _ = start_mlflow(tmp_path / "mlflow")
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out[-4000:]
        client = MlflowClient(uri)
        (child,) = _children(uri, "s")[1]
        history = {m.step: m.timestamp / 1000 for m in client.get_metric_history(child.info.run_id, "epoch")}
        assert sorted(history) == [1, 2, 3, 4, 5, 6]  # every epoch's metrics delivered
        assert sum(down < t < back for t in history.values()) >= 2  # logged as they ended, during the outage
        system = [m.timestamp / 1000 for m in client.get_metric_history(child.info.run_id, "system/rank0/cpu_utilization_percentage")]
        assert sum(down < t < back for t in system) >= 2  # sampled during the outage, delivered after it
    finally:
        _stop([proc] if proc else [])
        _end_group(server)


def _stop(procs: list) -> None:
    """A sweep still running when a test fails is interrupted: it stops its trials and its Ray."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=300)


def _wait(condition, proc, timeout: float = 1200) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        time.sleep(0.2)
    raise AssertionError("timed out waiting")
