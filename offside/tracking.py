"""MLflow conventions: every stage is one run in experiment `offside` (or $OFFSIDE_EXPERIMENT).

Default store: SQLite at `<work dir>/mlflow.db`, the work dir being the parent of the stage's output
directory; MLFLOW_TRACKING_URI overrides it. Params are the flattened config; tags carry stage,
method and scenario; artifacts are the stage directory's small files."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from offside.config import flatten

EXPERIMENT = "offside"
PARAM_VALUE_LIMIT = 6000


def tracking_uri(work_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(work_dir) / 'mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a SQLite store; None for a
    tracking server, whose --artifacts-destination decides."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def experiment_id(client: MlflowClient) -> str:
    """The id of experiment `offside` (or $OFFSIDE_EXPERIMENT), created on first use."""
    name = os.environ.get("OFFSIDE_EXPERIMENT", EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


class Run:
    """A thin handle on one MLflow run, batching writes."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def log_artifacts(self, directory: Path) -> None:
        for path in sorted(Path(directory).iterdir()):
            if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".jsonl", ".html", ".png"):
                self.client.log_artifact(self.run_id, str(path))


@contextmanager
def stage_run(work_dir: Path, run_name: str, config: dict, tags: dict[str, str]):
    """Opens a run, yields a Run; ends it FINISHED, or FAILED if the stage raised."""
    client = MlflowClient(tracking_uri(work_dir))
    run = client.create_run(experiment_id(client), run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    params = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(config).items()]
    for i in range(0, len(params), 90):
        client.log_batch(run.info.run_id, params=params[i : i + 90])
    try:
        yield Run(client, run.info.run_id)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
