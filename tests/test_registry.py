"""Unlearned models in the MLflow Model Registry, against a real `mlflow server` running MLflow's
basic-auth app: no credentials, no entry; with them, `offside unlearn --register` registers the
adapter and `models:/NAME@best` resolves to a directory that loads as that adapter."""

import json
from pathlib import Path

import pytest
import torch
from conftest import MLFLOW_ADMIN, start_mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster.local import _end_group
from offside.cli import main
from offside.errors import OffsideError
from offside.models.loading import ModelSpec, build_or_load
from offside.registry import resolve
from serve.settings import load_settings, registry

GOLDEN = Path("tests/golden").resolve()


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    """The server's URI in MLFLOW_TRACKING_URI, no credentials in the environment yet."""
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


def test_registered_adapters_resolve_by_alias_behind_basic_auth(auth_server, tmp_path, monkeypatch, capsys):
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(auth_server).search_experiments()
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):  # the stage's own run is refused
        _unlearn(tmp_path / "refused", "--register", "offside-ga")
    assert not (tmp_path / "refused").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN[1])
    for seed, run in enumerate(("ga-1", "ga-2")):
        assert _unlearn(tmp_path / run, "--register", "offside-ga", "--seed", str(seed)) == 0
    assert "registered models:/offside-ga/2 (alias best)" in capsys.readouterr().out

    client = MlflowClient(auth_server)
    best = client.get_model_version_by_alias("offside-ga", "best")
    manifest = json.loads((tmp_path / "ga-2" / "manifest.json").read_text())
    assert best.version == "2" and best.run_id == manifest["mlflow_run_id"]
    assert {k: best.tags[k] for k in ("method", "scenario", "stage", "data_hash")} == \
        {"method": "ga", "scenario": "complete", "stage": "unlearn", "data_hash": manifest["data_hash"]}

    resolved = resolve("models:/offside-ga@best")
    assert resolve("models:/offside-ga/2") == resolved
    weights = {name: build_or_load(ModelSpec(str(path)))[0].state_dict() for name, path in
               [("registered", resolved), ("trained", tmp_path / "ga-2"), ("first", tmp_path / "ga-1")]}
    assert all(torch.equal(w, weights["trained"][n]) for n, w in weights["registered"].items())
    assert not all(torch.equal(w, weights["first"][n]) for n, w in weights["registered"].items())

    entry = registry(load_settings({"models": {"ga": "models:/offside-ga@best"}}))["ga"]  # as `offside serve` starts
    assert (Path(entry.path), entry.base) == (resolved, str(GOLDEN / "model"))

    for uri, problem in [("models:/offside-nope@best", "offside-nope"), ("models:/offside-ga@worst", "worst"),
                         ("models:/offside-ga", "not a model registry URI")]:
        with pytest.raises(OffsideError, match=problem) as err:
            resolve(uri)
        assert uri in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(OffsideError, match="models:/offside-nope@best"):
        load_settings({"models": {"ga": "models:/offside-nope@best"}})
