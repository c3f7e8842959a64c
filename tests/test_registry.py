"""The MLflow Model Registry against real `mlflow server`s: registration through MLflow 3's logged
models and the `champion` alias, `models:/NAME@ALIAS` resolved once at a stage's start (eval, relearn,
export, the Serve settings), one download per version per node, and MLflow's basic-auth app."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MLFLOW_ADMIN, start_mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster.local import _end_group
from offside.cli import main
from offside.errors import OffsideError
from offside.models.loading import LoraSpec, ModelSpec, build_or_load, save
from offside.registry import CHAMPION, Objective, register, resolve
from offside.tracking import tracking_uri
from serve.settings import load_settings, registry
from test_paths import relative_to_cwd

GOLDEN = Path("tests/golden").resolve()
OBJECTIVE = "summary/forget_efficacy"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter (r 4, alpha 8) on the golden model, its B matrices non-zero so that it changes the model."""
    model, processor = build_or_load(ModelSpec(str(GOLDEN / "model"), lora=LoraSpec(r=4, alpha=8)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("adapter") / "ga"
    out.mkdir()
    save(model, processor, out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter):
    """One plain `mlflow server` for this module: (URI, its directory), with the adapter registered as
    version 1 of `offside-ga`, the champion on OBJECTIVE."""
    root = tmp_path_factory.mktemp("mlflow")
    proc, uri = start_mlflow(root)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("registry")).info.run_id
    register(adapter, "offside-ga", client, run, {"method": "ga"}, {OBJECTIVE: 0.5}, Objective(OBJECTIVE, 0.5))
    yield uri, root
    _end_group(proc)


@pytest.fixture
def on_server(server, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server[0])
    monkeypatch.setenv("OFFSIDE_EXPERIMENT", "registry")
    monkeypatch.setenv("OFFSIDE_REGISTRY_CACHE", str(tmp_path / "cache"))
    return server[0]


def test_champion_moves_only_to_a_better_version_of_the_same_objective(on_server, adapter):
    client = MlflowClient(on_server)
    run = client.create_run(client.get_experiment_by_name("registry").experiment_id).info.run_id

    def registered(value=None, metric=OBJECTIVE, direction="max", aliases=()):
        objective = Objective(metric, value, direction) if value is not None else None
        return register(adapter, "offside-champion", client, run, {"method": "ga"}, {OBJECTIVE: value or 0.0}, objective, aliases)

    assert registered().champion is None  # no objective: nothing to crown
    assert registered(0.6).champion == "2"  # the first with an objective
    assert registered(0.4, aliases=("best",)).champion == "2"  # worse: champion stays; a sweep's own pick is `best`
    assert registered(0.6).champion == "2"  # a tie does not move it
    assert registered(0.9, metric="summary/model_utility").champion == "2"  # another objective is not compared
    assert registered(0.1, direction="min").champion == "2"  # nor is the same metric in the other direction
    assert str(registered(0.7)) == "models:/offside-champion/7 (champion: this version)"

    model = client.get_registered_model("offside-champion")
    assert model.aliases == {CHAMPION: "7", "best": "3"}
    worse = client.get_model_version("offside-champion", "3")
    assert (worse.tags["objective_metric"], float(worse.tags["objective"]), worse.tags["objective_direction"]) == (OBJECTIVE, 0.4, "max")
    assert "objective" not in client.get_model_version("offside-champion", "1").tags
    model_id = worse.tags["offside.logged_model"]  # the version of an MLflow 3 logged model of the run, its metrics linked
    logged = client.get_logged_model(model_id)
    assert worse.source == logged.artifact_location and worse.run_id == run
    assert (str(logged.status), logged.source_run_id) == ("READY", run)
    assert {m.key: m.value for m in logged.metrics} == {OBJECTIVE: 0.4}
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "offside-champion", "version": "3"}]
    assert {f.path for f in client.list_logged_model_artifacts(model_id)} >= {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(OffsideError, match="direction 'up'"):
        Objective(OBJECTIVE, 1.0, "up")


def test_eval_and_relearn_of_a_registered_adapter_resolve_it_once(on_server, adapter, tmp_path, monkeypatch):
    """Run from one directory with relative --out and --data; every path their files record is read
    from another."""
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(GOLDEN / "data", tmp_path)
    cheap = ["--set", "eval.forms=[mcq]", "--set", "eval.limit=4"]
    assert main(["eval", "--model", "models:/offside-ga@champion", "--data", data, "--out", "runs/eval", "--suite", "efficacy", *cheap]) == 0
    assert main(["relearn", "--model", "models:/offside-ga@champion", "--data", data, "--out", "runs/relearn",
                 "--set", "train.max_steps=1", "--set", "eval.splits=[forget]", *cheap]) == 0
    monkeypatch.chdir(GOLDEN)

    cached = resolve("models:/offside-ga/1")
    assert cached.parent.parent.parent == tmp_path / "cache"
    assert json.loads((cached / "adapter_config.json").read_text())["base_model_name_or_path"] == str(GOLDEN / "model")
    for stage in ("eval", "relearn"):
        run_dir = tmp_path / "runs" / stage
        manifest = json.loads((run_dir / "manifest.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (manifest["model_uri"], manifest["model_version"], manifest["model_path"]) == ("models:/offside-ga@champion", "1", str(cached))
        assert config["model"]["name"] == "models:/offside-ga@champion"
        assert (config["out"], config["data"], manifest["data"]) == (str(run_dir), str(GOLDEN / "data"), str(GOLDEN / "data"))
        assert relative_to_cwd([config, manifest, json.loads((run_dir / "metrics.json").read_text())], tmp_path) == []
    evaluated = yaml.safe_load((tmp_path / "runs" / "eval" / "config.yaml").read_text())
    assert (evaluated["robustness"]["relearn_lora"]["r"], evaluated["robustness"]["relearn_lora"]["alpha"]) == (4, 8)
    relearned = build_or_load(ModelSpec(str(tmp_path / "runs" / "relearn")))[0].state_dict()
    merged = build_or_load(ModelSpec(str(adapter)))[0].state_dict()
    assert not all(torch.equal(w, merged[n]) for n, w in relearned.items())  # trained from the adapter, saved where it was told


def test_four_processes_resolving_at_once_download_once(on_server, server, tmp_path):
    """Ranks or replicas on one node resolve the same version together: one downloads, all get its directory."""
    script = ("import pathlib, sys, time\nfrom offside.registry import resolve\n"
              "pathlib.Path(sys.argv[2]).touch()\n"
              "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.01)\n"
              "print(resolve('models:/offside-ga@champion'))\n")
    go = tmp_path / "go"
    log = server[1] / "mlflow.log"

    def downloads() -> int:  # the server's access log: GETs of the adapter's weights
        return sum("GET /api/2.0/mlflow-artifacts/artifacts/" in line and "adapter_model.safetensors" in line
                   for line in log.read_text().splitlines())

    downloads_before = downloads()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go), str(tmp_path / f"ready{i}")], env=os.environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert (target / "adapter_model.safetensors").is_file()
    assert [p.name for p in target.parent.iterdir() if ".partial" in p.name] == []
    assert downloads() - downloads_before == 1


def test_serve_settings_look_registry_models_up_without_downloading(on_server, tmp_path):
    settings = load_settings({"models": {"ga": "models:/offside-ga@champion"}})  # the builder's and the ingress's check
    entry = registry(settings, download=False)["ga"]
    assert (entry.path, entry.base) == ("models:/offside-ga@champion", str(GOLDEN / "model"))
    assert not (tmp_path / "cache").exists()
    loaded = registry(settings)["ga"]  # as a replica loads it
    assert (Path(loaded.path), loaded.base) == (resolve("models:/offside-ga@champion"), str(GOLDEN / "model"))
    with pytest.raises(OffsideError, match="models:/offside-nope@champion"):
        load_settings({"models": {"ga": "models:/offside-nope@champion"}})


def test_a_stage_resolves_in_the_store_its_work_dir_registers_to(adapter, tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: registration and resolution both use <work dir>/mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OFFSIDE_REGISTRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "runs"
    client = MlflowClient(tracking_uri(work))
    run = client.create_run(client.create_experiment("registry", artifact_location=str(work / "artifacts"))).info.run_id
    register(adapter, "offside-local", client, run, {}, {}, Objective(OBJECTIVE, 0.3))
    assert main(["export", "--model", "models:/offside-local@champion", "--out", "runs/merged"]) == 0
    exported = json.loads((work / "merged" / "export.json").read_text())
    assert (exported["from"], exported["version"]) == ("models:/offside-local@champion", "1")
    merged, _ = build_or_load(ModelSpec(str(work / "merged")))
    direct, _ = build_or_load(ModelSpec(str(adapter)))
    assert all(torch.allclose(w, direct.state_dict()[n]) for n, w in merged.state_dict().items())
    for uri, problem in [("models:/offside-nope@champion", "offside-nope"), ("models:/offside-local@worst", "worst"),
                         ("models:/offside-local", "not a model registry URI")]:
        with pytest.raises(OffsideError, match=problem) as err:
            resolve(uri, tracking_uri(work))
        assert uri in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(OffsideError, match="set MLFLOW_TRACKING_URI"):
        resolve("models:/offside-local@champion")


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    """A basic-auth server's URI in MLFLOW_TRACKING_URI, no credentials in the environment yet."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "server").mkdir()
    proc, uri = start_mlflow(tmp_path / "server", auth=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OFFSIDE_EXPERIMENT", "registry")
    monkeypatch.setenv("OFFSIDE_REGISTRY_CACHE", str(tmp_path / "cache"))
    yield uri
    _end_group(proc)


def _unlearn(out: Path, *extra: str) -> int:
    return main(["unlearn", "--method", "ga", "--data", str(GOLDEN / "data"), "--model", str(GOLDEN / "model"),
                 "--out", str(out), "--set", "model.lora={r: 4, alpha: 8}", "--set", "train.max_steps=2",
                 "--set", "train.lr=0.01", *extra])


def test_registered_stages_resolve_behind_basic_auth(auth_server, tmp_path, monkeypatch, capsys):
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(auth_server).search_experiments()
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):  # the stage's own run is refused
        _unlearn(tmp_path / "refused", "--register", "offside-ga")
    assert not (tmp_path / "refused").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN[1])
    for seed, run in enumerate(("ga-1", "ga-2")):
        assert _unlearn(tmp_path / run, "--register", "offside-ga", "--seed", str(seed)) == 0
    # A stage has no objective: it is a new version, never the champion.
    assert "registered models:/offside-ga/2 (champion: none (no version with an objective))" in capsys.readouterr().out

    client = MlflowClient(auth_server)
    second = client.get_model_version("offside-ga", "2")
    manifest = json.loads((tmp_path / "ga-2" / "manifest.json").read_text())
    assert second.run_id == manifest["mlflow_run_id"] and client.get_registered_model("offside-ga").aliases == {}
    assert {k: second.tags[k] for k in ("method", "scenario", "stage", "data_hash")} == \
        {"method": "ga", "scenario": "complete", "stage": "unlearn", "data_hash": manifest["data_hash"]}
    metrics = json.loads((tmp_path / "ga-2" / "metrics.json").read_text())
    assert {m.key: m.value for m in client.get_logged_model(second.tags["offside.logged_model"]).metrics} == pytest.approx(metrics)

    resolved = resolve("models:/offside-ga/2")
    weights = {name: build_or_load(ModelSpec(str(path)))[0].state_dict() for name, path in
               [("registered", resolved), ("trained", tmp_path / "ga-2"), ("first", tmp_path / "ga-1")]}
    assert all(torch.equal(w, weights["trained"][n]) for n, w in weights["registered"].items())
    assert not all(torch.equal(w, weights["first"][n]) for n, w in weights["registered"].items())

    entry = registry(load_settings({"models": {"ga": "models:/offside-ga/2"}}))["ga"]  # as a replica loads it
    assert (Path(entry.path), entry.base) == (resolved, str(GOLDEN / "model"))
