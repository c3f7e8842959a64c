import os

# No test may reach a model or dataset hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Under pytest-xdist each worker computes on its share of the cores: torch would otherwise start a
# thread per core in every worker, and oversubscribed OpenMP threads spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


# The files that take longest (CONTRIBUTING.md's tables), longest first: pytest-xdist hands files out
# in collection order (`--no-loadscope-reorder`), so its workers start on the long ones and end
# together, instead of one worker finishing a long file alone at the end of the run.
LONGEST_FIRST = ("test_quickstart.py", "test_real_scale.py", "test_tune.py", "test_eval_golden.py", "test_serve.py",
                 "test_cluster_multinode.py", "test_distributed.py", "test_sweep_faults.py", "test_model_placement.py",
                 "test_matrix.py", "test_engine_distributed.py", "test_serve_chat.py", "test_cluster_jobs.py",
                 "test_registry.py", "test_sanity.py", "test_serve_lm_eval.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def once_per_run(tmp_path_factory, name: str, build):
    """What `build(directory)` returns (JSON-able), built once per test run: under pytest-xdist the
    workers share one directory, the first to get here builds under a lock and the others reuse it."""
    import json

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, above each worker's own
    target = root / name
    with FileLock(f"{target}.lock"):
        done = root / f"{name}.json"
        if not done.exists():
            target.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(build(target)))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's main job as the README writes it (`--out runs/quickstart`, relative to the directory
    it runs in), run once per test run: (output dir, its stdout). Later tests reuse its benchmark and
    vanilla model instead of training another."""
    from pathlib import Path

    def build(root):
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # its unlearning sweep starts a local Ray
        proc = subprocess.run([sys.executable, "-m", "offside.cli", "quickstart", "--out", "runs/quickstart"],
                              capture_output=True, text=True, timeout=1500, env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [str(root / "runs" / "quickstart"), proc.stdout]

    out, stdout = once_per_run(tmp_path_factory, "quickstart", build)
    return Path(out), stdout


@pytest.fixture(scope="session")
def tiny_vanilla(tmp_path_factory):
    """A 4-player synthetic benchmark and a briefly trained tiny vanilla model: (data dir, model dir).
    Enough for sweeps to exercise their machinery; not a model that knows the benchmark."""
    from pathlib import Path

    def build(root):
        from offside.data.synth import generate
        from offside.engine.trainer import TrainSpec
        from offside.models.loading import ModelSpec
        from offside.stages import FinetuneConfig, finetune

        data = generate(root / "data", players=4, seed=0)
        spec = TrainSpec(epochs=3, lr=3e-3, batch_size=32, warmup_ratio=0.05, weight_decay=0.0)
        os.environ.setdefault("OFFSIDE_EXPERIMENT", "offside")
        result = finetune(FinetuneConfig(data=str(data), out=str(root / "vanilla"), model=ModelSpec("tiny"), train=spec), progress=False)
        return [str(data), str(result.run_dir)]

    return tuple(Path(p) for p in once_per_run(tmp_path_factory, "tiny", build))


@pytest.fixture
def local_ray_env(monkeypatch):
    """Token auth off (Ray ≥ 2.59 turns it on for a local ray.init) and CPU DeepSpeed, for this
    process and the subprocesses and Ray workers it starts."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def untrained_tiny_bench(root, seed: int):
    """A 2-player synthetic benchmark and a freshly built (untrained) tiny model in eval mode:
    (model, processor, rows per split, data dir). For tests of evaluation machinery, not of skill."""
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.data.synth import generate
    from offside.models.loading import ModelSpec, build_or_load

    data = generate(root / "bench", players=2, seed=seed)
    bench = load_benchmark(data)
    rows = {s: materialise(bench[s]) for s in bench}
    texts = [r[c] for split in rows.values() for r in split for c in ("question", "answer")]
    model, processor = build_or_load(ModelSpec("tiny"), texts, seed=0)
    return model.eval(), processor, rows, data


def run_ranks(worker, out, world: int = 2) -> None:
    """Runs `worker(rank, world, port, out)` in `world` spawned processes that form a gloo group on a
    free loopback port (the worker calls init_process_group with them)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, str(out)), nprocs=world, join=True)


MLFLOW_ADMIN = ("offside-admin", "a-long-test-passw0rd")


def start_mlflow(root, auth: bool = False):
    """A real `mlflow server` on a free loopback port, its stores under `root`: (process, URI). With
    `auth`, MLflow's basic-auth app with the admin MLFLOW_ADMIN. Stop it with cluster.local._end_group."""
    import time
    import urllib.request
    from pathlib import Path

    from cluster.local import _end_group, free_port

    root = Path(root)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes (~2 GB)
    args = ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    if auth:
        (root / "auth.ini").write_text(
            f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
            f"admin_username = {MLFLOW_ADMIN[0]}\nadmin_password = {MLFLOW_ADMIN[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="test-csrf-key")
        args = ["--app-name", "basic-auth", *args]
    log = open(root / "mlflow.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            assert proc.poll() is None, (root / "mlflow.log").read_text()[-2000:]
            time.sleep(1)
    _end_group(proc)
    raise AssertionError("mlflow server did not start")
