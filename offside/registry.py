"""Unlearned models in the MLflow Model Registry.

`register` logs a model directory (a LoRA adapter: MBs; a full model: its weights) as the artifacts
`model/` of an MLflow run and makes it a new version of a registered model, tagged with what made it
and given the alias `best`. `resolve` turns `models:/NAME@ALIAS` or `models:/NAME/VERSION` back into
a local model directory (downloaded once into a cache, OFFSIDE_REGISTRY_CACHE), against MLFLOW_TRACKING_URI with the
credentials of MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow's client reads.

An adapter names its base by a path relative to itself, which a download does not keep: the version
records the base's absolute path (tag `offside.base`), and a resolved adapter points at it again. So
an adapter resolves where its base is reachable (the shared runs storage on a cluster)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from offside.errors import OffsideError
from offside.models.loading import adapter_base, is_model_dir

ALIAS = "best"
BASE_TAG = "offside.base"
ARTIFACT_PATH = "model"
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def register(directory: Path, name: str, client: MlflowClient, run_id: str, tags: dict[str, str]) -> str:
    """Registers `directory` as a new version of `name` (created if new) with alias `best`, its files
    logged under run `run_id`; returns the version."""
    directory = Path(directory).resolve()
    if not is_model_dir(directory):
        raise OffsideError(f"register: {directory} is not a model or adapter directory")
    client.log_artifacts(run_id, str(directory), ARTIFACT_PATH)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if (directory / "adapter_config.json").exists():
        tags = {**tags, BASE_TAG: adapter_base(directory)}  # absolute, or a hub id
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, ALIAS, version.version)
    return str(version.version)  # an int from a database store, a str from a server


def register_stage(run_dir: Path, name: str) -> str:
    """`offside unlearn --register NAME`: registers a finished stage's directory under its own run,
    tagged with its method, scenario and data hash."""
    import yaml

    from offside.tracking import tracking_uri

    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tags = {"method": config.get("method"), "scenario": config.get("scenario"), "stage": manifest["stage"],
            "data_hash": manifest["data_hash"]}
    client = MlflowClient(tracking_uri(run_dir.parent))
    return register(run_dir, name, client, manifest["mlflow_run_id"], tags)


def is_registry_uri(name: str) -> bool:
    return name.startswith("models:/")


def resolve(uri: str) -> Path:
    """The local model directory of a registry URI (downloaded on first use into OFFSIDE_REGISTRY_CACHE,
    default <tmp>/offside-registry); a one-line OffsideError naming the URI when it is malformed or
    names no model version."""
    match = URI.match(uri)
    if not match:
        raise OffsideError(f"{uri}: not a model registry URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    server = os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(server)
    name = match["name"]
    try:
        version = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
                   else client.get_model_version(name, match["version"]))
    except MlflowException as err:
        raise OffsideError(f"{uri}: {_first_line(err)}") from None
    store = hashlib.sha256(str(server).encode()).hexdigest()[:12]  # versions of two servers never share a copy
    cache = Path(os.environ.get("OFFSIDE_REGISTRY_CACHE") or Path(tempfile.gettempdir()) / "offside-registry")
    target = cache / store / name / str(version.version)
    if not target.exists():
        _download(server, version, target)
    return target


def _download(tracking_uri: str | None, version, target: Path) -> None:
    import mlflow.artifacts

    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(partial),
                                                         tracking_uri=tracking_uri))
        if BASE_TAG in version.tags:
            config = local / "adapter_config.json"
            settings = json.loads(config.read_text())
            settings["base_model_name_or_path"] = version.tags[BASE_TAG]
            config.write_text(json.dumps(settings, indent=2))
        local.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
