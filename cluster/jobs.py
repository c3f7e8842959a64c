"""Run `offside` commands on a Ray cluster through the Ray Jobs API, and follow, list, stop them.

Ray is imported inside the functions: the `offside` CLI loads this module on every call. Every
failure a user can cause (an address nothing answers at, a runtime-env file that is missing,
malformed or has unknown keys, a missing or rejected auth token, an unknown job id) is an
OffsideError with a one-line message, raised before anything is sent where it can be checked."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from offside.errors import OffsideError
from offside.provenance import GIT_SHA_ENV, git_sha

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0
# Read from the submitting shell and passed to the job unless the runtime env sets them.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "OFFSIDE_EXPERIMENT")
RUNS_DIR_ENV = "OFFSIDE_RUNS_DIR"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# The entrypoint runs with the cluster's PATH: on the node image (cluster/docker/Dockerfile) `python`
# is the interpreter the project is installed in. A dashboard port-forwarded to localhost is still a
# remote cluster, so the address says nothing about which interpreter is right: --python overrides.
DEFAULT_PYTHON = "python"


def _one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is a dashboard URL, else
    the local default."""
    env_address = os.environ.get("RAY_ADDRESS", "")
    value = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
             or (env_address if env_address.startswith(("http://", "https://")) else "") or DEFAULT_ADDRESS)
    if "://" not in value:
        value = f"http://{value}"
    parts = urlsplit(value)
    try:
        parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise OffsideError(f"cluster address {value!r}: expected the Ray dashboard URL, http(s)://HOST:PORT (e.g. {DEFAULT_ADDRESS})")
    return value.rstrip("/")


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fails within `timeout_s` when nothing listens at the address (the Jobs client itself has no timeout)."""
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OffsideError(f"cannot reach the Ray cluster at {address}: {reason} (is the head node's dashboard up and its port forwarded?)") from err


def _enable_token_auth_if_available() -> None:
    """The Jobs client sends the auth token only in token mode. Like `ray start`, turn token mode on
    when RAY_AUTH_MODE is unset and a token exists ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token); an explicit RAY_AUTH_MODE is respected."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextmanager
def api_errors(address: str, job_id: str | None = None):
    """Turns the Jobs client's exceptions into one-line OffsideErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        rejected = "Forbidden" in str(err) or "invalid" in str(err)
        what = "rejected the auth token" if rejected else "requires an auth token"
        raise OffsideError(
            f"the Ray cluster at {address} {what}: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        ) from err
    except (OSError, RuntimeError, ValueError) as err:
        text = _one_line(err)
        if job_id and "404" in text:
            raise OffsideError(f"no job {job_id!r} on the Ray cluster at {address}") from err
        raise OffsideError(f"Ray Jobs API at {address}: {text}") from err


def connect(address: str | None = None):
    """A JobSubmissionClient for the cluster, after a fast reachability check."""
    address = resolve_address(address)
    check_reachable(address)
    _enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    with api_errors(address), _only_address(address):
        return address, JobSubmissionClient(address)


@contextmanager
def _only_address(address: str):
    """The Jobs client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address it is given
    (a job's own environment has RAY_ADDRESS set to its cluster): pin it to the one resolved here."""
    saved = {name: os.environ.get(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_runtime_env(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise OffsideError(f"runtime env {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise OffsideError(f"runtime env {path}: not valid YAML: {where}{getattr(err, 'problem', None) or _one_line(err)}") from err
    return validate_runtime_env(data if data is not None else {}, str(path))


def runtime_env_keys() -> list[str]:
    from ray.runtime_env import RuntimeEnv

    return sorted(key for key in RuntimeEnv.known_fields if not key.startswith("_"))


def validate_runtime_env(data: object, source: str) -> dict:
    """Checks keys and types before submission; Ray would otherwise treat an unknown key as a plugin
    name and fail later on the cluster."""
    from ray.runtime_env import RuntimeEnv

    if not isinstance(data, dict):
        raise OffsideError(f"runtime env {source}: must be a mapping of runtime env keys, got {type(data).__name__}")
    valid = runtime_env_keys()
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise OffsideError(f"runtime env {source}: unknown key {unknown[0]!r} (valid keys: {', '.join(valid)})")
    env_vars = data.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise OffsideError(f"runtime env {source}: 'env_vars' must be a mapping of NAME: value")
    for name, value in env_vars.items():
        if not isinstance(value, str):
            raise OffsideError(f"runtime env {source}: env_vars.{name} must be a string (quote it), got {value!r}")
    working_dir = data.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir and not Path(working_dir).exists():
        raise OffsideError(f"runtime env {source}: working_dir {working_dir!r} does not exist")
    try:
        RuntimeEnv(**data)
    except (TypeError, ValueError) as err:
        raise OffsideError(f"runtime env {source}: {_one_line(err)}") from err
    return dict(data)


def entrypoint(command: list[str], python: str, runs_dir: str | None = None) -> str:
    """The shell command the job runs: `<python> -m offside.cli <command>`. With `runs_dir` (the
    runtime env's OFFSIDE_RUNS_DIR, e.g. the shared volume's /mnt/shared/runs) the job first links
    `runs` in its working dir to it: the upload excludes runs/, so relative `runs/...` paths in the
    command and its configs reach the shared volume as they do in the node image's own directory."""
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] == "offside":
        command = command[1:]
    if not command:
        raise OffsideError("nothing to submit: give an offside command after --, e.g. offside submit -- tune --config sweep.yaml")
    from offside.cli import build_parser

    build_parser().parse_args(command)  # a typo fails here (argparse exits 2), not on the cluster
    line = shlex.join([python, "-m", "offside.cli", *command])
    return f"ln -sfn {shlex.quote(runs_dir)} runs && {line}" if runs_dir else line


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise OffsideError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def build_runtime_env(runtime_env_file: str | None, working_dir: str | None, env: dict[str, str]) -> dict:
    """The file's runtime env; --env on top; MLFLOW_TRACKING_URI, the MLflow credentials
    (MLFLOW_TRACKING_USERNAME / _PASSWORD) and OFFSIDE_EXPERIMENT from this shell where the file does
    not set them; OFFSIDE_GIT_SHA, this checkout's commit. Working dir:
    --working-dir, else the file's, else '.'."""
    runtime_env = load_runtime_env(runtime_env_file) if runtime_env_file else {}
    if working_dir is not None or "working_dir" not in runtime_env:
        runtime_env = validate_runtime_env({**runtime_env, "working_dir": working_dir or "."}, "--working-dir")
    env_vars = dict(runtime_env.get("env_vars") or {})
    for name in FORWARDED_ENV:
        if name not in env_vars and os.environ.get(name):
            env_vars[name] = os.environ[name]
    env_vars.update(env)
    env_vars.setdefault(GIT_SHA_ENV, git_sha())  # the uploaded working dir has no .git for the manifests to read
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def submit(
    command: list[str],
    address: str | None = None,
    runtime_env_file: str | None = None,
    working_dir: str | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
) -> tuple[str, str]:
    """Submits `offside <command>`; returns (address, job id). Everything local is checked first."""
    runtime_env = build_runtime_env(runtime_env_file, working_dir, env or {})
    address = resolve_address(address)
    line = entrypoint(command, python or DEFAULT_PYTHON, runtime_env.get("env_vars", {}).get(RUNS_DIR_ENV))
    address, client = connect(address)
    job_id = f"offside-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with api_errors(address):
        client.submit_job(entrypoint=line, runtime_env=runtime_env, submission_id=job_id, metadata={"offside_command": line})
    return address, job_id


def follow(address: str | None, job_id: str, out=sys.stdout) -> str:
    """Streams the job's logs until it ends; returns its final status."""
    address, client = connect(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with api_errors(address, job_id):
        asyncio.run(tail())
        status = client.get_job_status(job_id)
        while str(status) not in TERMINAL_STATES:  # the log stream can close a moment before the status settles
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    return str(status)


def require_success(address: str | None, job_id: str, status: str) -> None:
    if status != "SUCCEEDED":
        message = (job_info(address, job_id).message or "no message").split(", last available logs")[0]
        raise OffsideError(f"job {job_id} {status}: {_one_line(message)} (logs: offside jobs logs {job_id})")


def job_info(address: str | None, job_id: str):
    address, client = connect(address)
    with api_errors(address, job_id):
        return client.get_job_info(job_id)


def job_logs(address: str | None, job_id: str) -> str:
    address, client = connect(address)
    with api_errors(address, job_id):
        return client.get_job_logs(job_id)


def list_jobs(address: str | None) -> list:
    address, client = connect(address)
    with api_errors(address):
        return sorted(client.list_jobs(), key=lambda job: job.start_time or 0)


def stop_job(address: str | None, job_id: str, wait_s: float = 30.0) -> str:
    """Asks the job to stop and waits (up to wait_s) for a terminal status; returns it."""
    address, client = connect(address)
    with api_errors(address, job_id):
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        status = str(client.get_job_status(job_id))
        while status not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            status = str(client.get_job_status(job_id))
    return status
