"""Unlearned models in the MLflow Model Registry.

`register` makes a model directory (a LoRA adapter: MBs; a full model: its weights) an MLflow 3 logged
model of the run that made it (the directory its artifacts, the given metrics linked to it) and a new
version of a registered model, tagged with what made it and the objective it scored, if any. Aliases:
- `champion`: the version whose objective is best so far. It moves only to a version that beats it on
  the same objective (metric and direction, recorded on each version); a version without an objective,
  or with another one, leaves it where it is.
- `best`: a sweep's own pick, the version the latest sweep of that name registered (its best trial),
  whatever came before it.

`resolve` turns `models:/NAME@ALIAS` or `models:/NAME/VERSION` back into a local model directory, read
in the tracking store given (a stage passes the one its own run and `--register` use) or else
MLFLOW_TRACKING_URI, with the credentials of MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
Each version is downloaded once per node into OFFSIDE_REGISTRY_CACHE (default <tmp>/offside-registry):
the first process takes a file lock and downloads, the others wait and get the same directory.

An adapter names its base by a path relative to itself, which a download does not keep: the version
records the base's absolute path (tag `offside.base`), and a resolved adapter points at it again. So
an adapter resolves where its base is reachable (the shared runs storage on a cluster).

No torch here (resolving is what every rank and replica does first); `register` imports the model
zoo when it runs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import LoggedModel, LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from offside.errors import OffsideError

CHAMPION = "champion"
SWEEP_ALIAS = "best"
BASE_TAG = "offside.base"
LOGGED_MODEL_TAG = "offside.logged_model"  # MLflow's SQL registry does not keep a version's model_id
CACHE_ENV = "OFFSIDE_REGISTRY_CACHE"
DIRECTIONS = ("max", "min")
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Objective:
    """What a version scored: `metric` names what was measured (versions compare only on the same
    metric and direction), `direction` says whether higher (max) or lower (min) is better."""

    metric: str
    value: float
    direction: str = "max"

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise OffsideError(f"objective {self.metric!r}: direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")

    def beats(self, other: Objective | None) -> bool:
        if other is None or (other.metric, other.direction) != (self.metric, self.direction):
            return False
        return self.value > other.value if self.direction == "max" else self.value < other.value

    def tags(self) -> dict[str, str]:
        return {"objective": repr(float(self.value)), "objective_metric": self.metric, "objective_direction": self.direction}

    @classmethod
    def recorded(cls, tags: dict[str, str]) -> Objective | None:
        """The objective a version's tags record, or None (none, or not one this module wrote)."""
        if not {"objective", "objective_metric", "objective_direction"} <= set(tags):
            return None
        try:
            return cls(tags["objective_metric"], float(tags["objective"]), tags["objective_direction"])
        except (ValueError, OffsideError):
            return None


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    champion: str | None  # the champion's version once this one is registered (None: there is none)

    def __str__(self) -> str:
        crowned = ("this version" if self.champion == self.version
                   else f"stays version {self.champion}" if self.champion else "none (no version with an objective)")
        return f"models:/{self.name}/{self.version} (champion: {crowned})"


def register(directory: Path, name: str, client: MlflowClient, run_id: str, tags: dict[str, str],
             metrics: dict[str, float] | None = None, objective: Objective | None = None,
             aliases: tuple[str, ...] = ()) -> Registration:
    """Logs `directory` as a logged model of run `run_id` (with `metrics` linked to it) and registers it
    as a new version of `name` (created if new) with `tags`, the objective's tags and `aliases`; moves
    `champion` to it if its objective beats the champion's."""
    from offside.models.loading import ADAPTER_FILE, adapter_base, is_model_dir

    directory = Path(directory).resolve()
    if not is_model_dir(directory):
        raise OffsideError(f"register: {directory} is not a model or adapter directory")
    tags = {**tags, **(objective.tags() if objective else {})}
    if (directory / ADAPTER_FILE).exists():
        tags[BASE_TAG] = adapter_base(directory)  # absolute, or a hub id
    tags = {k: str(v) for k, v in tags.items()}
    model = _logged_model(directory, name, client, run_id, tags, metrics or {})
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The source is the logged model's artifact location, not `models:/<model_id>`: MLflow's SQL registry
    # looks that up in the process's default tracking store, not the client's (sqlalchemy_store.py).
    tags[LOGGED_MODEL_TAG] = model_id = model.model_id
    version = str(client.create_model_version(name, model.artifact_location, run_id=run_id, tags=tags, model_id=model_id).version)
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version}])})
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return Registration(name, version, _crown(client, name, version, objective))


def _logged_model(directory: Path, name: str, client: MlflowClient, run_id: str, tags: dict[str, str],
                  metrics: dict[str, float]) -> LoggedModel:
    """A READY logged model of the run holding the directory's files, `metrics` linked to it (what the
    experiment's Models page shows)."""
    experiment = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment, name=name, source_run_id=run_id, tags=tags, model_type="offside")
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        client.log_model_artifacts(model.model_id, str(directory))
        now = int(time.time() * 1000)
        linked = [Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in metrics.items()]
        for i in range(0, len(linked), 900):
            client.log_batch(run_id, metrics=linked[i:i + 900])
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    return client.finalize_logged_model(model.model_id, "READY")


def _crown(client: MlflowClient, name: str, version: str, objective: Objective | None) -> str | None:
    """Moves `champion` to `version` when its objective beats the champion's (or there is no champion
    yet); returns the champion's version afterwards."""
    current = client.get_registered_model(name).aliases.get(CHAMPION)
    if objective is None:
        return current
    if current is not None and not objective.beats(Objective.recorded(client.get_model_version(name, current).tags)):
        return current
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def register_stage(run_dir: Path, name: str) -> Registration:
    """`offside unlearn --register NAME`: registers a finished stage's directory under its own run,
    tagged with its method, scenario and data hash, its metrics linked to the logged model. A stage
    has no objective, so it never becomes the champion."""
    import yaml

    from offside.tracking import tracking_uri

    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tags = {"method": config.get("method"), "scenario": config.get("scenario"), "stage": manifest["stage"],
            "data_hash": manifest["data_hash"]}
    client = MlflowClient(tracking_uri(run_dir.parent))
    return register(run_dir, name, client, manifest["mlflow_run_id"], tags, metrics)


def is_registry_uri(name: str) -> bool:
    return name.startswith("models:/")


@dataclass(frozen=True)
class LocalModel:
    """A model as a stage names it (`name`: a registry URI, an absolute directory, a hub id or `tiny`)
    and what loads here (`path`: for a registry URI, the directory its version was downloaded to)."""

    name: str
    path: str
    version: str | None = None  # a registry URI's version

    def manifest(self, prefix: str = "model") -> dict:
        return {f"{prefix}_uri": self.name if self.version else None, f"{prefix}_version": self.version}


def local_model(name: str, store: str | None) -> LocalModel:
    """Resolves a model name once, at a stage's start: a registry URI (looked up in `store`) to its
    downloaded directory, a directory to its absolute path; a hub id and `tiny` stay as they are."""
    if is_registry_uri(name):
        path, version = _resolve(name, store)
        return LocalModel(name, str(path), version)
    if name and name != "tiny" and Path(name).exists():
        name = str(Path(name).resolve())
    return LocalModel(name, name)


def resolve(uri: str, store: str | None = None) -> Path:
    """The local model directory of a registry URI, looked up in `store` (default: MLFLOW_TRACKING_URI);
    a one-line OffsideError naming the URI when it is malformed or names no model version."""
    return _resolve(uri, store)[0]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    base: str | None  # an adapter's base model (tag offside.base); None: a full model


def lookup(uri: str, store: str | None = None) -> RegisteredVersion:
    """The version a registry URI names, as `resolve` finds it, without downloading it."""
    version = _version(uri, store)[1]
    return RegisteredVersion(version.name, str(version.version), version.tags.get(BASE_TAG))


def _resolve(uri: str, store: str | None) -> tuple[Path, str]:
    store, version = _version(uri, store)
    cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "offside-registry")
    store_key = hashlib.sha256(store.encode()).hexdigest()[:12]  # versions of two stores never share a copy
    target = cache / store_key / version.name / str(version.version)
    if not target.is_dir():  # complete once it exists: it appears by a rename
        target.parent.mkdir(parents=True, exist_ok=True)
        with _node_lock(target.parent / f".{target.name}.lock"):
            if not target.is_dir():  # another process downloaded it while this one waited
                _download(store, version, target)
    return target, str(version.version)


def _version(uri: str, store: str | None):
    """(the store, the ModelVersion) a registry URI names."""
    match = URI.match(uri)
    if not match:
        raise OffsideError(f"{uri}: not a model registry URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    store = store or os.environ.get("MLFLOW_TRACKING_URI")
    if not store:
        raise OffsideError(f"{uri}: no tracking store to look it up in; set MLFLOW_TRACKING_URI to the one that registered it")
    client = MlflowClient(store)
    try:
        return store, (client.get_model_version_by_alias(match["name"], match["alias"]) if match["alias"]
                       else client.get_model_version(match["name"], match["version"]))
    except MlflowException as err:
        raise OffsideError(f"{uri}: {_first_line(err)} (tracking store {store})") from None


@contextmanager
def _node_lock(path: Path):
    """An exclusive lock between the processes of one node (ranks, replicas), released on exit or death."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(store: str, version, target: Path) -> None:
    import mlflow.artifacts

    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a process that died downloading
        shutil.rmtree(stale, ignore_errors=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        # Where the version's files are, asked of the store itself (MLflow's `models:/` artifact repository
        # would ask the process's default registry).
        source = MlflowClient(store).get_model_version_download_uri(version.name, version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=store))
        if BASE_TAG in version.tags:
            config = local / "adapter_config.json"
            settings = json.loads(config.read_text())
            settings["base_model_name_or_path"] = version.tags[BASE_TAG]
            config.write_text(json.dumps(settings, indent=2))
        try:
            local.rename(target)
        except OSError:
            if not target.is_dir():  # a process elsewhere (a cache on shared storage) won the rename: use its copy
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
