"""Every cluster definition under cluster/ loads and is checked: required fields, the Ray version and
image tags equal the project's Ray, the RayService serves serve/config.yaml's applications, the
DeepSpeed files are valid DeepSpeed and reach the engine, the sweeps and runtime envs validate."""

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from offside.errors import OffsideError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY = version("ray")
NODE_TAG = f"{RAY}-py311-gpu"
NODE_IMAGE = f"registry.example.com/offside/node:{NODE_TAG}"


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def load(rel: str):
    return yaml.safe_load((CLUSTER / rel).read_text())


def load_all(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d]


def kind(docs: list[dict], name: str) -> dict:
    found = [d for d in docs if d["kind"] == name]
    assert len(found) == 1, f"expected one {name}"
    return found[0]


def raycluster_spec() -> dict:
    return kind(load_all("kuberay/raycluster.yaml"), "RayCluster")["spec"]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def test_project_ray_is_the_pin_everything_uses():
    assert RAY == "2.60.0"  # a Ray upgrade must move every definition (this file checks each one)
    import ray

    assert ray.__version__ == RAY


# --- cluster launcher -------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["launcher/aws.yaml", "launcher/gcp.yaml"])
def test_launcher_config_passes_rays_schema_and_pins(rel):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(rel)
    validate_config(prepare_config(load(rel)))  # Ray's own ray-schema.json, after filling provider defaults
    assert config["docker"]["image"] == NODE_IMAGE
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["driver"] >= 1
    (gpu_name,) = [name for name in types if name != config["head_node_type"]]
    gpu = types[gpu_name]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    node = gpu["node_config"]
    spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or {"preemptible": True} in node.get("scheduling", [])
    assert spot, "GPU workers run on spot/preemptible capacity"
    assert all("RAY_AUTH_MODE=token ray start" in c for c in config["head_start_ray_commands"][:1] + config["worker_start_ray_commands"])
    assert config["file_mounts"]["/home/ray/.ray/auth_token"]
    mlflow = " ".join(config["head_start_ray_commands"][1:])
    assert "mlflow server" in mlflow and "--allowed-hosts" in mlflow and "--backend-store-uri sqlite:" in mlflow
    assert re.search(r"--artifacts-destination (s3|gs)://", mlflow)
    assert "ray stop" not in yaml.safe_dump(config)


def test_launcher_schema_check_catches_a_wrong_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("launcher/aws.yaml")
    config["available_node_types"]["gpu_spot"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate_config(prepare_config(config))


# --- KubeRay -----------------------------------------------------------------------------------

def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert json.loads(json.loads(head["rayStartParams"]["resources"]))["driver"] >= 1
    ports = {p["name"]: p["containerPort"] for p in containers(head)[0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379 and ports["serve"] == 8000
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert containers(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in (head, gpu):
        (container,) = containers(group)
        assert container["image"] == NODE_IMAGE
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]


def test_raycluster_manifest():
    docs = load_all("kuberay/raycluster.yaml")
    assert {d["apiVersion"] for d in docs} == {"v1", "ray.io/v1"}
    check_ray_cluster_spec(raycluster_spec())
    claim = kind(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert raycluster_spec()["headGroupSpec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_rayjob_runs_a_valid_sweep_on_the_same_cluster_spec():
    from tune_jobs.spec import load_sweep

    job = kind(load_all("kuberay/rayjob-sweep.yaml"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["rayClusterSpec"] == raycluster_spec()
    assert spec["shutdownAfterJobFinishes"] is True
    match = re.fullmatch(r"python -m offside\.cli tune --config (\S+) --address auto", spec["entrypoint"])
    assert match, spec["entrypoint"]
    sweep = load_sweep(ROOT / match.group(1))
    assert sweep.storage.startswith("/mnt/shared/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == load("runtime_env/kuberay.yaml")["env_vars"]


def test_rayservice_serves_the_serve_config_applications():
    service = kind(load_all("kuberay/rayservice-probe.yaml"), "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    assert service["spec"]["rayClusterConfig"] == raycluster_spec()
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"] == yaml.safe_load((ROOT / "serve/config.yaml").read_text())["applications"]
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # the proxy must be reachable from the Service


# --- images --------------------------------------------------------------------------------------

def test_node_image_builds_from_the_ray_pin_with_the_project_constraints():
    text = (CLUSTER / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == f"rayproject/ray:{NODE_TAG}"
    assert f'ARG TORCH_VERSION={pins()["torch"]}' in text  # the CUDA wheel of the constraints' torch
    assert "pip install --no-cache-dir -c constraints.txt ." in text
    assert f'ray=={RAY}' in text and "ln -s /mnt/shared/runs" in text
    for path in ("pyproject.toml", "offside", "tune_jobs", "serve", "cluster"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path


def test_mlflow_server_deployment():
    mlflow_pin = pins()["mlflow"]
    assert re.search(r"^FROM (\S+)$", (CLUSTER / "mlflow/Dockerfile").read_text(), re.M).group(1) == f"ghcr.io/mlflow/mlflow:v{mlflow_pin}"
    docs = load_all("mlflow/mlflow.yaml")
    (container,) = containers(kind(docs, "Deployment")["spec"])
    assert container["image"].endswith(f"/mlflow:{mlflow_pin}")
    (script,) = container["args"]
    assert container["command"] == ["sh", "-c"] and "exec mlflow server --app-name basic-auth" in script
    args = dict(re.findall(r'--([a-z-]+)\s+"?([^\s"\\]+)', script.split("exec mlflow server", 1)[1]))
    assert args["backend-store-uri"].startswith("postgresql://") and args["artifacts-destination"].startswith("s3://")
    allowed = args["allowed-hosts"].split(",")
    uri = load("runtime_env/kuberay.yaml")["env_vars"]["MLFLOW_TRACKING_URI"]
    assert uri.removeprefix("http://") in allowed  # MLflow 3 answers 403 to unlisted Host headers
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert services["mlflow"]["selector"] == kind(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert uri == f"http://mlflow.offside.svc.cluster.local:{services['mlflow']['ports'][0]['port']}"
    assert "@mlflow-db.offside.svc.cluster.local:5432/" in args["backend-store-uri"] and "mlflow-db" in services
    for env in (containers(g)[0]["env"] for g in (raycluster_spec()["headGroupSpec"], *raycluster_spec()["workerGroupSpecs"])):
        assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in env
        for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert {"name": name, "valueFrom": {"secretKeyRef": {"name": "offside-mlflow-auth", "key": key}}} in env


def test_mlflow_admits_only_authenticated_ray_pods():
    """Basic auth with the admin from the Secret the Ray pods read; NetworkPolicies admit only Ray pods
    to the server and only the server to its database. (A real basic-auth server refusing a client
    without credentials: tests/test_registry.py.)"""
    docs = load_all("mlflow/mlflow.yaml")
    deployment = kind(docs, "Deployment")["spec"]
    (container,) = containers(deployment)
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secrets["MLFLOW_ADMIN_USERNAME"] == {"name": "offside-mlflow-auth", "key": "username"}
    assert secrets["MLFLOW_ADMIN_PASSWORD"] == {"name": "offside-mlflow-auth", "key": "password"}
    assert secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == "offside-mlflow-auth"
    ini = container["args"][0].split("<<EOF", 1)[1].split("EOF", 1)[0]
    assert "admin_username = ${MLFLOW_ADMIN_USERNAME}" in ini and "default_permission = NO_PERMISSIONS" in ini
    config_path = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_AUTH_CONFIG_PATH")
    assert config_path.endswith(".ini") and 'cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF' in container["args"][0]
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    server = policies["mlflow"]
    assert server["podSelector"]["matchLabels"] == deployment["selector"]["matchLabels"] and server["policyTypes"] == ["Ingress"]
    (rule,) = server["ingress"]
    assert rule["from"] == [{"podSelector": {"matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}}]
    assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]
    (rule,) = policies["mlflow-db"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": deployment["selector"]["matchLabels"]}}]


# --- runtime envs, DeepSpeed, sweeps ---------------------------------------------------------------

@pytest.mark.parametrize("rel", ["runtime_env/kuberay.yaml", "runtime_env/launcher.yaml"])
def test_runtime_env_files_validate(rel):
    from cluster.jobs import load_runtime_env

    env = load_runtime_env(CLUSTER / rel)
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_files_are_valid_deepspeed_and_reach_the_engine(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from offside.engine.trainer import TrainSpec, _with_deepspeed_file

    path = CLUSTER / f"deepspeed/zero{stage}.json"
    extra = json.loads(path.read_text())
    zero = DeepSpeedZeroConfig(**extra["zero_optimization"])  # DeepSpeed's model forbids unknown keys
    assert int(zero.stage) == stage and zero.overlap_comm
    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}
    merged = _with_deepspeed_file(base, str(path))
    assert merged["zero_optimization"] == extra["zero_optimization"] and merged["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(OffsideError, match=r"zero_optimization.stage=.*train.zero_stage"):
        _with_deepspeed_file({**base, "zero_optimization": {"stage": 0}}, str(path))
    assert TrainSpec(deepspeed=str(path)).deepspeed == str(path)


def test_deepspeed_file_errors_name_the_file(tmp_path):
    from offside.engine.trainer import _with_deepspeed_file

    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(OffsideError, match="train.deepspeed: cannot read DeepSpeed config .*ds.json"):
        _with_deepspeed_file({}, str(bad))
    with pytest.raises(OffsideError, match="cannot read"):
        _with_deepspeed_file({}, str(tmp_path / "missing.json"))


@pytest.mark.parametrize("rel", ["sweeps/qwen3b-zero2.yaml", "sweeps/qwen7b-zero3.yaml"])
def test_gpu_sweeps_validate_and_match_their_deepspeed_file(rel):
    from tune_jobs.spec import load_sweep

    sweep = load_sweep(CLUSTER / rel)
    assert sweep.resources.gpus_per_worker == 1
    assert (sweep.dtype, sweep.device) == ("bf16", "auto")  # the sizing below assumes bf16 weights on each rank's GPU
    ds = json.loads((ROOT / sweep.train.deepspeed).read_text())
    assert ds["zero_optimization"]["stage"] == sweep.train.zero_stage


CHECKED = {
    "launcher/aws.yaml", "launcher/gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml",
    "kuberay/rayservice-probe.yaml", "docker/Dockerfile", "mlflow/Dockerfile", "mlflow/mlflow.yaml",
    "runtime_env/kuberay.yaml", "runtime_env/launcher.yaml", "deepspeed/zero2.json", "deepspeed/zero3.json",
    "sweeps/qwen3b-zero2.yaml", "sweeps/qwen7b-zero3.yaml",
}


def test_every_definition_in_cluster_is_checked_here():
    found = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*")
             if p.is_file() and (p.suffix in (".yaml", ".yml", ".json") or p.name == "Dockerfile")}
    assert found == CHECKED, "a new definition needs its checks in this file"


def test_every_yaml_parses_with_kinds_and_names():
    for rel in sorted(CHECKED):
        if rel.endswith(".yaml") and rel.startswith(("kuberay/", "mlflow/")):
            for doc in load_all(rel):
                assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], rel
                assert doc["metadata"]["namespace"] == "offside", rel
