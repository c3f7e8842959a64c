"""MLflow conventions: artifacts beside their store, asynchronous metric delivery through a tracking
server outage (a real `mlflow server`), attempt marking."""

import json
import time

from mlflow.tracking import MlflowClient

from offside.tracking import stage_run
from conftest import start_mlflow
from tune_jobs.tracking import MetricLog, begin_attempt, deliver_spilled


def test_artifacts_land_beside_the_sqlite_store_not_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OFFSIDE_EXPERIMENT", "artifacts-test")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    work, out = tmp_path / "work", tmp_path / "work" / "stage"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"a": 1}))
    with stage_run(work, "stage", {"x": 1}, {"stage": "test"}) as run:
        run.log_artifacts(out)
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    artifact_uri = client.get_run(run.run_id).info.artifact_uri
    assert artifact_uri.startswith((work / "mlartifacts").as_uri())
    assert json.loads((work / "mlartifacts" / artifact_uri.split("/mlartifacts/")[1] / "metrics.json").read_text()) == {"a": 1}
    assert not any(elsewhere.iterdir())  # no ./mlruns where the command ran


def test_metrics_logged_while_the_tracking_server_is_down_are_delivered_when_it_is_back(tmp_path, monkeypatch):
    """Logging returns at once with the server down; what the run could not deliver before it ended
    waits in its spill file, and the sweep delivers it once a real `mlflow server` is back."""
    import cluster.local
    from cluster.local import _end_group, free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no retries left running when the test ends
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store the server will serve
    run_id = store.create_run(store.create_experiment("outage")).info.run_id
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing answers there yet
    spill = tmp_path / "sweep" / "workers" / "t0" / "undelivered-1.jsonl"
    spill.parent.mkdir(parents=True)
    log = MetricLog(uri, run_id, spill)
    started = time.monotonic()
    for step in (1, 2):
        log.log({"loss": 1.0 / step}, step=step, timestamp_ms=1000 * step, tags={"offside.attempts": "1"})
    assert time.monotonic() - started < 5  # hang bound: logging does not wait for the server
    assert log.close(timeout_s=1) == 2 and len(spill.read_text().splitlines()) == 2
    monkeypatch.setattr(cluster.local, "free_port", lambda: port)
    server, _ = start_mlflow(tmp_path)
    try:
        assert deliver_spilled(uri, tmp_path / "sweep") == 2 and not spill.exists()
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value, m.timestamp) for m in history) == [(1, 1.0, 1000), (2, 0.5, 2000)]
        assert MlflowClient(uri).get_run(run_id).data.tags["offside.attempts"] == "1"
    finally:
        _end_group(server)


def test_an_epoch_run_again_by_a_resumed_attempt_is_logged_under_its_attempt(tmp_path):
    first = begin_attempt(tmp_path, from_epoch=0)
    assert first.keys(1, {"loss": 1.0}) == {"loss": 1.0, "attempt": 1}
    first.logged(1)
    first.logged(2)  # epoch 2 was logged, but its checkpoint never committed: the next attempt starts from epoch 1
    second = begin_attempt(tmp_path, from_epoch=1)
    assert (second.number, second.logged_epoch) == (2, 2)
    assert second.keys(2, {"loss": 0.9}) == {"attempt2/loss": 0.9}  # the re-run of epoch 2
    assert second.keys(3, {"loss": 0.8}) == {"loss": 0.8, "attempt": 2}  # new ground
    assert second.tags()["offside.attempts"] == "2" and second.tags()["offside.attempt.2"].startswith("from epoch 1,")
