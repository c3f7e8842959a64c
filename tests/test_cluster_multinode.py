"""A real multi-node Ray cluster on one machine: a head and a worker started as separate `ray start`
processes with different resources, a real `mlflow server` on loopback running MLflow's basic-auth
app, and the tiny sweep (tune_jobs/configs/tiny.yaml) submitted with `offside submit --wait`, the
MLflow credentials forwarded from the submitting shell. Checks that the job SUCCEEDED, that trials
ran on both nodes, and that the sweep's runs and its registered best model are in the server.

The submission is the local-cluster form of docs/how-to/cluster.md: the sweep config's relative
`runs/quickstart/...` and `runs/tune` paths (runs/ is not uploaded) reach a local runs directory
through `--env OFFSIDE_RUNS_DIR=...`."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cluster.local import LocalCluster, _end_group
from conftest import MLFLOW_ADMIN, start_mlflow

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "cluster/deepspeed/zero2.json"


def tiny_benchmark(root: Path) -> tuple[Path, Path]:
    """Synthetic data for 4 players and an untrained tiny model: enough to run the sweep's plumbing."""
    from offside.data.loader import load_benchmark
    from offside.data.synth import generate
    from offside.models.loading import ModelSpec, build_or_load, save

    data = Path(generate(root / "data", players=4, seed=0))
    bench = load_benchmark(data)
    texts = [t for split in bench.values() for column in ("question", "answer") for t in split[column]]
    model, processor = build_or_load(ModelSpec("tiny"), texts, seed=0)
    vanilla = root / "vanilla"
    vanilla.mkdir()
    save(model, processor, vanilla)
    return data, vanilla


@pytest.mark.slow
def test_tiny_sweep_runs_on_both_nodes_of_a_real_cluster_and_lands_in_mlflow(tmp_path):
    runs = tmp_path / "runs"  # what `offside quickstart --out runs/quickstart` leaves, where tiny.yaml looks
    tiny_benchmark(runs / "quickstart")
    mlflow_proc, mlflow_uri = start_mlflow(tmp_path, auth=True)
    credentials = {"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN[0], "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN[1]}
    cluster = LocalCluster()
    try:
        # Different resources per node: a trial is 1 driver CPU + 2 workers x 1 CPU = 3 CPUs, more than
        # either node has, so every trial must be placed across both nodes.
        cluster.start_head(num_cpus=2, resources={"head_node": 1})
        cluster.add_worker(num_cpus=2, resources={"worker_node": 1})
        from ray.util.state import list_nodes

        nodes = {n.node_id: n.resources_total for n in list_nodes(address=cluster.address, detail=True)}
        assert len(nodes) == 2 and sorted("head_node" in r for r in nodes.values()) == [False, True]

        proc = subprocess.run(
            [sys.executable, "-m", "offside.cli", "submit", "--address", cluster.address, "--env", f"MLFLOW_TRACKING_URI={mlflow_uri}",
             "--env", f"OFFSIDE_RUNS_DIR={runs}", "--wait", "--", "tune", "--config", "tune_jobs/configs/tiny.yaml",
             "--address", "auto", "--set", "name=multinode", "--set", "num_samples=2", "--set", "train.epochs=1",
             "--set", "train.zero_stage=2", "--set", f"train.deepspeed={ZERO2}", "--set", "epoch_eval.limit=8"],
            capture_output=True, text=True, cwd=ROOT, env={**cluster.env(), **credentials}, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        job_id = proc.stdout.splitlines()[0]
        assert f"job {job_id} SUCCEEDED" in proc.stdout
        assert (runs / "tune" / "multinode" / "best.yaml").is_file()  # storage: runs/tune, through the link

        trial_nodes = trial_actor_nodes(cluster, job_id)
        assert set(trial_nodes) == set(nodes), trial_nodes  # trials ran on both nodes

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(mlflow_uri).search_experiments()
        os.environ.update(credentials)
        client = MlflowClient(mlflow_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
        assert len(children) >= 2, [(r.info.run_name, r.data.tags) for r in runs]
        assert all(r.data.metrics for r in children)
        best = client.get_model_version_by_alias("offside-multinode", "best")
        assert best.run_id in {p.info.run_id for p in parents} and best.tags["method"] == "ga"
    finally:
        for name in credentials:
            os.environ.pop(name, None)
        cluster.stop()
        _end_group(mlflow_proc)


def trial_actor_nodes(cluster: LocalCluster, submission_id: str) -> dict[str, list[str]]:
    """Node id → class names of the job's actors other than the job supervisor (the trials' drivers,
    Train controllers and Train workers), from Ray's state API."""
    from ray.util.state import list_actors

    job = json.loads(urllib.request.urlopen(f"{cluster.address}/api/jobs/{submission_id}", timeout=10).read())
    actors = list_actors(address=cluster.address, filters=[("job_id", "=", job["job_id"])], detail=True, limit=10000)
    nodes: dict[str, list[str]] = {}
    for actor in actors:
        if actor.class_name != "JobSupervisor":
            nodes.setdefault(actor.node_id, []).append(actor.class_name)
    return nodes
