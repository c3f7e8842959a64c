"""The probe app's settings (the `args:` of `serve/config.yaml`, or `offside serve` flags), the model
registry they name, and the API token. No Ray here: the builder and the replicas both use it.

A registered model is a name → a saved model directory (a full model or an export) or a PEFT adapter
directory (`adapter_config.json`, what a LoRA stage writes; its base is the adapter's
`base_model_name_or_path`, relative to the adapter, unless `base:` names it — itself possibly an
adapter, which the replica loads merged). Requests name models only by their registered name, never by path."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from offside.config import from_dict
from offside.errors import OffsideError
from offside.models.loading import ADAPTER_FILE, DTYPES, adapter_base, is_model_dir
from offside.registry import is_registry_uri, lookup, resolve

TOKEN_ENV = "OFFSIDE_API_TOKEN"
REPLICA_DEVICES = ("auto", "cpu", "cuda")
MAX_ONGOING_REQUESTS = 256  # per probe replica
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclass
class Limits:
    max_body_bytes: int = 12_000_000
    max_image_bytes: int = 8_000_000  # decoded image file
    max_image_pixels: int = 4096 * 4096  # checked from the header, before decoding (decompression bombs)
    max_prompt_chars: int = 4000
    max_prompt_tokens: int = 2048  # a /v1/completions prompt (what lm-evaluation-harness sends by default)
    max_tokens: int = 256
    max_options: int = 8
    max_option_chars: int = 500
    max_messages: int = 16
    max_images: int = 4  # per chat request, over all its messages


@dataclass
class ServeSettings:
    models: dict = field(default_factory=dict)  # name → directory, or {path: DIR, base: DIR}
    data: str | None = None  # benchmark directory: enables `image_id` in requests
    token_file: str | None = None  # secret file with the bearer token ($OFFSIDE_API_TOKEN wins)
    max_models_per_replica: int = 4  # LRU capacity of the multiplexed model cache
    batching: bool = True
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    num_replicas: int = 1  # the replicas at start (and always, unless max_replicas > min_replicas)
    min_replicas: int | None = None  # autoscaling bounds; None: num_replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica, what autoscaling aims at (a batch fills at max_batch_size)
    replica_cpus: float = 1.0
    torch_threads: int = 1
    max_new_tokens: int = 32  # default `max_tokens` (what `offside eval` generates)
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the replicas' weights (as model.dtype in the stages)
    device: str = "auto"  # auto | cpu | cuda: a replica asks Ray for one GPU unless cpu (auto: when the cluster has one)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str  # the model directory (full) or the adapter directory
    base: str | None  # None: a full model; else the base model directory of an adapter


def load_settings(args: dict | None, source: str = "serve args") -> ServeSettings:
    settings = from_dict(ServeSettings, args or {}, source)
    if not settings.models:
        raise OffsideError(f"{source}: 'models' must register at least one model (name: directory)")
    if settings.max_models_per_replica < 1 or settings.max_batch_size < 1 or settings.num_replicas < 1:
        raise OffsideError(f"{source}: max_models_per_replica, max_batch_size and num_replicas must be ≥ 1")
    _check_replicas(settings, source)
    if settings.token_file and not Path(settings.token_file).is_file():
        raise OffsideError(f"{source}: token_file {settings.token_file!r} does not exist")
    if settings.data and not Path(settings.data).is_dir():
        raise OffsideError(f"{source}: data {settings.data!r} is not a directory")
    if settings.dtype not in DTYPES:
        raise OffsideError(f"{source}: dtype {settings.dtype!r} is not one of {', '.join(DTYPES)}")
    if settings.device not in REPLICA_DEVICES:
        raise OffsideError(f"{source}: device {settings.device!r} is not one of {', '.join(REPLICA_DEVICES)} "
                           "(Ray assigns each replica its GPU, so a replica never names one)")
    registry(settings, download=False)
    return settings


def _check_replicas(settings: ServeSettings, source: str) -> None:
    low, high = replica_range(settings)
    if not 0 <= low <= settings.num_replicas <= high or high < 1:
        raise OffsideError(f"{source}: replicas need 0 ≤ min_replicas ≤ num_replicas ≤ max_replicas and max_replicas ≥ 1 "
                           f"(num_replicas is the autoscaler's start; min and max default to it), "
                           f"got min_replicas {low}, num_replicas {settings.num_replicas}, max_replicas {high}")
    target = settings.target_ongoing_requests
    if not 0 < target <= MAX_ONGOING_REQUESTS:
        raise OffsideError(f"{source}: target_ongoing_requests must be > 0 and ≤ {MAX_ONGOING_REQUESTS} "
                           f"(a replica's max_ongoing_requests), got {target}")


def replica_range(settings: ServeSettings) -> tuple[int, int]:
    """(min, max) replicas; autoscaling is on when max > min."""
    low = settings.num_replicas if settings.min_replicas is None else settings.min_replicas
    high = settings.num_replicas if settings.max_replicas is None else settings.max_replicas
    return low, high


def replica_gpus(settings: ServeSettings, cluster_gpus: float) -> int:
    """GPUs one replica asks Ray for: its model's device (auto: a GPU when the cluster has one)."""
    if settings.device == "auto":
        return int(cluster_gpus > 0)
    return int(settings.device == "cuda")


def settings_dict(settings: ServeSettings) -> dict:
    return asdict(settings)


def registry(settings: ServeSettings, download: bool = True) -> dict[str, ModelEntry]:
    """name → ModelEntry with absolute paths; fails naming the bad entry. Without `download`, a registry
    URI is looked up but not downloaded (its path stays the URI): for what only checks or lists models."""
    return {name: _entry(name, value, download) for name, value in settings.models.items()}


def _entry(name: str, value, download: bool = True) -> ModelEntry:
    where = f"models.{name}"  # a directory, or a registry URI (models:/NAME@ALIAS, resolved to one)
    if not isinstance(name, str) or not NAME.match(name):
        raise OffsideError(f"{where}: a model name is 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict) or set(value) - {"path", "base"} or not isinstance(value.get("path"), str):
        raise OffsideError(f"{where}: expected a directory or a mapping {{path: DIR, base: DIR}}")
    if is_registry_uri(value["path"]) and not download:
        registered_base = lookup(value["path"]).base  # None: a full model
        base = registered_base and (value.get("base") or registered_base)
        if base and not is_model_dir(Path(base).expanduser()):
            raise OffsideError(f"{where}: adapter {value['path']} needs its base model directory (set base:), got {base!r}")
        return ModelEntry(name, value["path"], str(Path(base).expanduser().resolve()) if base else None)
    path = resolve(value["path"]) if is_registry_uri(value["path"]) else Path(value["path"]).expanduser().resolve()
    if (path / ADAPTER_FILE).is_file():
        try:
            base = Path(value["base"]).expanduser().resolve() if value.get("base") else Path(adapter_base(path))
        except OffsideError as error:
            raise OffsideError(f"{where}: {error} (or set base:)") from None
        if not is_model_dir(base):
            raise OffsideError(f"{where}: adapter {path} needs its base model directory (set base:), got {str(base)!r}")
        return ModelEntry(name, str(path), str(base))
    if not (path / "config.json").is_file():
        raise OffsideError(f"{where}: {path} is neither a model directory (config.json) nor an adapter ({ADAPTER_FILE})")
    return ModelEntry(name, str(path), None)


def tokenizer_dir(entry: ModelEntry) -> str:
    """The directory with the model's tokenizer: the model's, or its base's (through adapter bases)."""
    path = Path(entry.base or entry.path)
    while (path / ADAPTER_FILE).is_file():
        path = Path(adapter_base(path))
    return str(path)


def read_token(token_file: str | None) -> str | None:
    """The bearer token every route but /healthz requires, or None (auth off)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise OffsideError(f"token_file {token_file}: is empty")
    return token or None
