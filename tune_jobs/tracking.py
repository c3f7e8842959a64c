"""MLflow for sweeps: one parent run per sweep and one child run per trial, both get-or-create by tag
so a resumed sweep or a restarted trial never makes a second run; a Tune callback closes the child runs
of trials that ASHA stopped (KILLED) or that failed (FAILED), which would otherwise stay RUNNING."""

from __future__ import annotations

import os

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from offside.config import flatten
from offside.tracking import EXPERIMENT, PARAM_VALUE_LIMIT

SWEEP_TAG = "offside.sweep"
TRIAL_TAG = "ray_trial_id"


def experiment_id(client: MlflowClient) -> str:
    name = os.environ.get("OFFSIDE_EXPERIMENT", EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _find(client: MlflowClient, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id(client)], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def parent_run(uri: str, sweep: str, params: dict) -> str:
    """The sweep's parent run (reopened as RUNNING when a sweep resumes)."""
    client = MlflowClient(uri)
    tags = {SWEEP_TAG: sweep, "stage": "sweep"}
    run_id = _find(client, tags)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = client.create_run(experiment_id(client), run_name=f"sweep-{sweep}", tags=tags).info.run_id
    log_params(client, run_id, params)
    return run_id


def child_run(uri: str, parent: str, sweep: str, trial_id: str, params: dict, tags: dict[str, str]) -> str:
    client = MlflowClient(uri)
    run_id = _find(client, {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {"mlflow.parentRunId": parent, SWEEP_TAG: sweep, TRIAL_TAG: trial_id, **tags}
    run_id = client.create_run(experiment_id(client), run_name=f"{sweep}-{trial_id}", tags=all_tags).info.run_id
    log_params(client, run_id, params)
    return run_id


def trial_runs(uri: str, sweep: str) -> dict[str, object]:
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id(client)], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    batch = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(params).items()]
    for i in range(0, len(batch), 90):
        client.log_batch(run_id, params=batch[i : i + 90])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
    batch = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    client = MlflowClient(uri)
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])


def close_trial(uri: str, sweep: str, trial_id: str, status: str) -> None:
    run_id = _find(MlflowClient(uri), {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
    if run_id:
        MlflowClient(uri).set_terminated(run_id, status)


def closing_callback(uri: str, sweep: str, planned_epochs):
    """A ray.tune Callback (built here so ray is imported only when a sweep runs) that closes child
    runs: FINISHED when the trial ran all its epochs, KILLED when the scheduler stopped it, FAILED
    when it errored after its retries."""
    from ray.tune import Callback

    class CloseTrialRuns(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0)
            done = epoch >= planned_epochs(trial.config)
            close_trial(uri, sweep, trial.trial_id, "FINISHED" if done else "KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            close_trial(uri, sweep, trial.trial_id, "FAILED")

    return CloseTrialRuns()
