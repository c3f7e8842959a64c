"""Model settings: plain data, importable without torch (the command line checks a config against
them before any heavy library loads). `offside/models/loading.py` builds and loads models from them.

`check_model_name` tells a missing local directory from a hub id before anything is downloaded or
loaded: a name that can only be a path (absolute, `./`, `~`, or more than one `/`) and does not
exist is "no such directory"."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from offside.errors import OffsideError

WEIGHT_DTYPES = ("fp32", "bf16", "fp16")  # what weights are held and saved in
DTYPE_CHOICES = ("auto", *WEIGHT_DTYPES)  # auto: the checkpoint's own (`offside.models.loading.resolved_dtype`)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
REGISTRY_PREFIX = "models:/"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name"


@dataclass
class TinySpec:
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 4
    mlp: int = 512
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 96
    vision_heads: int = 2
    image_size: int = 56


@dataclass
class LoraSpec:
    """LoRA adapters on the modules of `groups`. Each group has its own targets (the last part of the
    module names it adapts):
    - language: `targets` in `model.language_model.layers.N.{self_attn,mlp}`
      (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj);
    - vision: `vision_targets` in `model.visual.blocks.N.{attn,mlp}` (qkv, proj, gate_proj, up_proj, down_proj);
    - projector: `projector_targets` in `model.visual.merger.mlp` (its Linear layers 0 and 2; 1 is a GELU)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    groups: list[str] = field(default_factory=lambda: ["language"])
    vision_targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])
    projector_targets: list[str] = field(default_factory=lambda: ["0", "2"])


@dataclass
class ModelSpec:
    """`name`: "tiny" (built from scratch), a saved model directory, or a hub id. A registry URI
    (`models:/NAME@ALIAS`) is resolved to its directory where a stage starts (`offside.registry.local_model`)."""

    name: str = "tiny"
    image_size: int | None = None  # None: the saved model's, else 56 for tiny / 252 for real models
    # auto | fp32 | bf16 | fp16: the weights' dtype in every stage, trial and replica. auto: the dtype the
    # checkpoint was saved in (a published Qwen2.5-VL: bf16; a saved tiny model: fp32), fp32 for "tiny"
    dtype: str = "auto"
    device: str = "auto"  # auto (this process's GPU when there is one, else the CPU) | cpu | cuda | cuda:N
    tiny: TinySpec = field(default_factory=TinySpec)
    lora: LoraSpec | None = None
    freeze_vision: bool = False


def check_model(spec: ModelSpec, key: str = "model") -> None:
    """What can be checked without loading anything: dtype, device, and the name (`check_model_name`)."""
    if spec.dtype not in DTYPE_CHOICES:
        raise OffsideError(f"{key}.dtype: unknown dtype {spec.dtype!r} (valid: {', '.join(DTYPE_CHOICES)})")
    if not DEVICE_PATTERN.fullmatch(spec.device):
        raise OffsideError(f"{key}.device: {spec.device!r} is not a device (valid: auto, cpu, cuda, cuda:N)")
    check_model_name(spec.name, key)


def check_model_name(name: str, key: str = "model") -> None:
    """A model is `tiny`, a registry URI (models:/NAME@ALIAS), an existing directory, or a hub id. A name
    that is not a hub id and names no directory is an error naming the path."""
    if not name:
        raise OffsideError(f"{key}: a model name or directory is required (--model)")
    if name == "tiny" or name.startswith(REGISTRY_PREFIX):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OffsideError(f"{key}: {name}: not a directory (a model is a directory: config.json and weights)")
        return
    if not looks_like_hub_id(name):
        raise OffsideError(f"{key}: {name}: no such directory")


def looks_like_hub_id(name: str) -> bool:
    """`Qwen/Qwen2.5-VL-3B-Instruct` or `gpt2`; not `/abs/path`, `./rel`, `~/x` or `a/b/c`."""
    return bool(HUB_ID.fullmatch(name)) and not name.startswith(".")
