"""`offside submit` and `offside jobs` against a real token-authenticated Ray cluster (a `ray start
--head` child process with its own ports and temp dir), and the fast failures that need no cluster."""

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import LocalCluster, free_port
from offside.cli import main
from offside.provenance import git_sha

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def token_cluster():
    cluster = LocalCluster(auth_token=secrets.token_hex(16))
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def offside(*args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "offside.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("offside: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_submit_wait_status_logs_list(token_cluster, tmp_path):
    mlflow_env = {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "MLFLOW_TRACKING_USERNAME": "ray",
                  "MLFLOW_TRACKING_PASSWORD": "a-passw0rd"}  # forwarded from this shell to the job
    env = {**token_cluster.env(), **mlflow_env}
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text("env_vars:\n  OFFSIDE_EXPERIMENT: cluster-test\n  FROM_FILE: file\n")
    out = tmp_path / "bench"
    proc = offside("submit", "--address", token_cluster.address, "--runtime-env", str(runtime_env), "--env", "FROM_FILE=flag",
                   "--wait", "--", "data", "synth", "--out", str(out), "--players", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("offside-") and f"job {job_id} SUCCEEDED" in proc.stdout
    assert str(out) in proc.stdout  # the job's own output, streamed back
    assert len(json.loads((out / "forget_set.json").read_text())) == 2 * 14  # 2 players x 1 forget image x 14 QAs

    elsewhere = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}"}  # --address wins over it
    status = offside("jobs", "status", job_id, "--address", token_cluster.address, env=elsewhere)
    assert status.returncode == 0 and status.stdout.startswith("SUCCEEDED"), status.stderr
    logs = offside("jobs", "logs", job_id, "--address", token_cluster.address, env=env)
    assert "-m offside.cli data synth" in logs.stdout and str(out) in logs.stdout
    listing = offside("jobs", "list", "--json", "--address", token_cluster.address, env=env)
    jobs = {j["id"]: j for j in json.loads(listing.stdout)}
    assert jobs[job_id]["status"] == "SUCCEEDED"
    assert jobs[job_id]["entrypoint"].startswith("python -m offside.cli data synth")

    from ray.job_submission import JobSubmissionClient  # what the job really got as its runtime env

    env_vars = JobSubmissionClient(token_cluster.address, headers={"Authorization": f"Bearer {token_cluster.auth_token}"}) \
        .get_job_info(job_id).runtime_env["env_vars"]
    assert env_vars == {"OFFSIDE_EXPERIMENT": "cluster-test", "FROM_FILE": "flag", **mlflow_env,
                        "OFFSIDE_GIT_SHA": git_sha()}  # the upload has no .git; manifests read the commit from here
    assert len(git_sha()) == 40


def test_relative_runs_paths_reach_the_runs_dir_of_the_runtime_env(token_cluster, tmp_path):
    """The upload excludes runs/; with OFFSIDE_RUNS_DIR (the shared volume) `runs/...` resolves there."""
    shared = tmp_path / "shared-runs"
    main(["data", "synth", "--out", str(shared / "bench"), "--players", "2"])
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(f"env_vars:\n  OFFSIDE_RUNS_DIR: {shared}\nexcludes: [runs/]\n")
    proc = offside("submit", "--address", token_cluster.address, "--runtime-env", str(runtime_env), "--wait",
                   "--", "data", "stats", "runs/bench", "--json", env=token_cluster.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    here = offside("data", "stats", str(shared / "bench"), "--json", env=token_cluster.env())
    assert here.returncode == 0 and here.stdout.strip() in proc.stdout  # the job read the same benchmark


def test_stop_a_running_job(token_cluster):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(token_cluster.address, headers={"Authorization": f"Bearer {token_cluster.auth_token}"})
    job_id = client.submit_job(entrypoint=f"{sys.executable} -c 'import time; print(\"sleeping\", flush=True); time.sleep(600)'")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id)) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    env = token_cluster.env()
    proc = offside("jobs", "stop", job_id, "--address", token_cluster.address, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "STOPPED", proc.stdout + proc.stderr
    assert str(client.get_job_status(job_id)) == "STOPPED"


def test_a_failing_job_fails_submit_wait(token_cluster, tmp_path):
    proc = offside("submit", "--address", token_cluster.address, "--wait", "--", "data", "stats", str(tmp_path / "nothing"),
                   env=token_cluster.env())
    assert "FAILED" in one_line_error(proc)


def test_missing_and_wrong_tokens_are_clear_errors(token_cluster, tmp_path):
    env = {k: v for k, v in token_cluster.env().items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    missing = offside("jobs", "list", "--address", token_cluster.address, env=env)
    assert "requires an auth token" in one_line_error(missing) and "RAY_AUTH_TOKEN" in one_line_error(missing)
    wrong = offside("submit", "--address", token_cluster.address, "--", "data", "synth", "--out", str(tmp_path / "x"),
                    env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert "rejected the auth token" in one_line_error(wrong)
    unknown = offside("jobs", "status", "no-such-job", "--address", token_cluster.address, env=token_cluster.env())
    assert "no job 'no-such-job'" in one_line_error(unknown)


# --- failures before anything is sent: in-process, no cluster -------------------------------------

@pytest.fixture
def no_auth(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)


def run_main(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unreachable_address_fails_fast(no_auth, capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    code, err = run_main(capsys, "submit", "--address", address, "--", "data", "synth", "--out", "x")
    # a bound for a hang, not a speed (the Jobs client has no timeout of its own)
    assert code == 2 and time.monotonic() - start < 60
    assert err == f"offside: error: cannot reach the Ray cluster at {address}: Connection refused (is the head node's dashboard up and its port forwarded?)"
    code, err = run_main(capsys, "jobs", "list", "--address", address)
    assert code == 2 and "cannot reach the Ray cluster" in err
    code, err = run_main(capsys, "jobs", "list", "--address", "ftp://head:8265")
    assert code == 2 and "expected the Ray dashboard URL" in err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("env_vars: [a\n", "not valid YAML: line 2, column 1"),
    ("pipp: [numpy]\n", "unknown key 'pipp' (valid keys: conda, config,"),
    ("- working_dir\n", "must be a mapping of runtime env keys, got list"),
    ("env_vars: {MLFLOW_TRACKING_URI: 5000}\n", "env_vars.MLFLOW_TRACKING_URI must be a string"),
    ("working_dir: /no/such/dir\n", "working_dir '/no/such/dir' does not exist"),
    ("pip: [numpy]\nconda: {dependencies: [numpy]}\n", "cannot be specified at the same time"),
])
def test_bad_runtime_env_fails_before_contacting_the_cluster(no_auth, capsys, tmp_path, content, message):
    path = tmp_path / "runtime_env.yaml"
    if content is not None:
        path.write_text(content)
    # the address is unreachable too: the runtime env must be reported first, without a connection attempt
    code, err = run_main(capsys, "submit", "--address", f"http://127.0.0.1:{free_port()}", "--runtime-env", str(path),
                         "--", "data", "synth", "--out", "x")
    assert code == 2 and err.startswith(f"offside: error: runtime env {path}: ") and message in err, err
    assert "\n" not in err


def test_submit_needs_a_command_and_a_valid_env_flag(no_auth, capsys):
    code, err = run_main(capsys, "submit", "--address", "http://127.0.0.1:1", "--")
    assert code == 2 and "nothing to submit" in err
    code, err = run_main(capsys, "submit", "--env", "NOVALUE", "--", "data", "synth", "--out", "x")
    assert code == 2 and "--env 'NOVALUE': expected NAME=VALUE" in err


def test_working_dir_comes_from_the_flag_else_the_file_else_here(no_auth, tmp_path):
    from cluster.jobs import build_runtime_env

    (tmp_path / "code").mkdir()
    path = tmp_path / "runtime_env.yaml"
    path.write_text(f"working_dir: {tmp_path / 'code'}\n")
    assert build_runtime_env(None, None, {})["working_dir"] == "."
    assert build_runtime_env(str(path), None, {})["working_dir"] == str(tmp_path / "code")
    assert build_runtime_env(str(path), str(tmp_path), {})["working_dir"] == str(tmp_path)
