"""Model zoo: the `tiny` model and real Qwen2.5-VL checkpoints (local path or hub id), one code path.

A saved model directory is what `save_pretrained` writes (safetensors + config + tokenizer) plus
`offside_model.json` (the image size the model was trained with). An adapter directory is what a
LoRA stage saves: PEFT's `adapter_config.json` + adapter weights (+ tokenizer and `offside_model.json`),
whose `base_model_name_or_path` is the model it was trained on (a hub id, or a path relative to the
adapter directory): a model directory or another adapter directory (LoRA unlearning of a
LoRA-fine-tuned vanilla model). Loading an adapter loads its base (recursively) and merges the adapter
in memory; with `model.lora` set the merged model gets fresh adapters, so a saved adapter holds
exactly what its stage trained. `offside export` writes the merged model as a plain directory."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from offside.engine.comm import rank_cuda_device
from offside.errors import OffsideError
from offside.models.processor import Processor
from offside.models.spec import (DTYPE_CHOICES, LoraSpec, ModelSpec, TinySpec,  # noqa: F401  (specs: re-exported)
                                 check_model_name)
from offside.models.tiny import build_tiny
from offside.models.zero3 import load_partitioned, merge_adapter, partitioned

META_FILE = "offside_model.json"
REAL_IMAGE_SIZE = 252  # the published 256×256, rounded down to a multiple of 28 (81 visual tokens)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ADAPTER_FILE = "adapter_config.json"
hf_logging.disable_progress_bar()  # per-shard load/save bars; stages show their own progress

# LoRA target groups: a regex over Qwen2.5-VL module names (`model.language_model...`, `model.visual...`)
# and the LoraSpec field that lists the group's targets.
LORA_GROUPS = {
    "language": (r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{targets})", "targets"),
    "vision": (r"model\.visual\.blocks\.\d+\.(?:attn|mlp)\.(?:{targets})", "vision_targets"),
    "projector": (r"model\.visual\.merger\.mlp\.(?:{targets})", "projector_targets"),
}


def build_or_load(spec: ModelSpec, texts: list[str] | None = None, seed: int = 0, train=None):
    """Returns (model, processor), the model in spec.dtype on spec.device. `texts` train the tiny
    model's tokenizer when spec.name == "tiny". `train` (a TrainSpec): the training the model is loaded
    for; under ZeRO-3 a saved model is loaded partitioned across the process group's ranks (joined or
    made here), so that no rank holds the whole of it (offside/models/zero3.py)."""
    if spec.dtype not in DTYPE_CHOICES:
        raise OffsideError(f"model.dtype: unknown dtype {spec.dtype!r} (valid: {', '.join(DTYPE_CHOICES)})")
    if not spec.name:
        raise OffsideError("model: a model name or directory is required (--model)")
    dtype = DTYPES[resolved_dtype(spec)]
    device = resolve_device(spec.device)
    if spec.name == "tiny":
        if texts is None:
            raise OffsideError("model 'tiny' is built from scratch and needs training text (use `offside finetune`)")
        model, tokenizer = build_tiny(texts, spec.tiny, seed=seed)
        image_size = spec.image_size or spec.tiny.image_size
    else:
        model, tokenizer, saved_size = _load_pretrained(spec.name, dtype, _zero3_config(train, dtype, device))
        image_size = spec.image_size or saved_size
    if not partitioned(model):  # partitions are made in place, on the rank's device
        model.to(device=device, dtype=dtype)
    if spec.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, seed)
    return model, Processor(tokenizer, image_size, model.config.vision_config.spatial_merge_size)


def resolved_dtype(spec: ModelSpec) -> str:
    """spec.dtype, with `auto` resolved: fp32 for the tiny model, else the dtype the checkpoint's
    config.json records (an adapter's: its base's), bf16 when it records none."""
    if spec.dtype != "auto":
        return spec.dtype
    if spec.name == "tiny":
        return "fp32"
    path = Path(spec.name)
    if (path / ADAPTER_FILE).exists():
        return resolved_dtype(replace(spec, name=adapter_base(path)))
    if path.exists():
        _check_model_dir(path)
        config = json.loads((path / "config.json").read_text())
    else:
        from transformers import AutoConfig

        check_model_name(spec.name)
        try:
            config = AutoConfig.from_pretrained(spec.name).to_dict()
        except (OSError, ValueError) as err:
            raise _unloadable(spec.name, err) from err
    saved = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return {"float32": "fp32", "float16": "fp16"}.get(saved, "bf16")


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").exists():
        raise OffsideError(f"{path}: not a model directory (no config.json) nor an adapter directory ({ADAPTER_FILE})")


def _zero3_config(train, dtype: torch.dtype, device: torch.device) -> dict | None:
    """The DeepSpeed config of the ZeRO-3 training `train` (a TrainSpec) to load a model for, or None."""
    if train is None or train.zero_stage != 3:
        return None
    from offside.engine.trainer import check_engine_device, deepspeed_config, ensure_distributed

    check_engine_device(device)
    ensure_distributed()
    return deepspeed_config(train, dtype)


def resolve_device(device: str) -> torch.device:
    """The one place a device setting is resolved. `auto` is this process's GPU when torch sees one
    (cuda:$LOCAL_RANK under a launcher or Ray Train, the device DeepSpeed's engine uses), else the CPU."""
    if device == "auto":
        return rank_cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise OffsideError(f"model.device: {device!r} is not a device (valid: auto, cpu, cuda, cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OffsideError(f"model.device: {device} asked for, but torch sees no CUDA GPU (use auto or cpu)")
    return torch.device(device)


def _load_pretrained(name: str, dtype: torch.dtype, zero3: dict | None = None):
    """(model, tokenizer, image size) of a model directory, hub id or adapter directory (merged);
    partitioned (ZeRO-3) when `zero3`, a DeepSpeed config, is given."""
    path = Path(name)
    if (path / ADAPTER_FILE).exists():
        return _load_adapter(path, dtype, zero3)
    check_model_name(name)
    if path.exists():
        _check_model_dir(path)
    try:
        if zero3 is not None:
            model = load_partitioned(path if path.exists() else _downloaded(name), dtype, zero3)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _unloadable(name, err) from err
    if path.exists():
        model.config._name_or_path = str(path.resolve())  # what a LoRA stage on top of it names as its base
    return model, tokenizer, _saved_image_size(path)


def _unloadable(name: str, err: Exception) -> OffsideError:
    if not Path(name).exists():
        return OffsideError(f"model {name!r}: no such directory, and no such model on the Hugging Face Hub "
                            f"or in its cache ({type(err).__name__})")
    return OffsideError(f"cannot load model {name!r}: {' '.join(str(err).split())}")


def _downloaded(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub_id))


def _load_adapter(path: Path, dtype: torch.dtype, zero3: dict | None = None):
    from peft import PeftModel

    model, tokenizer, _ = _load_pretrained(adapter_base(path), dtype, zero3)
    adapted = PeftModel.from_pretrained(model, str(path))
    merged = merge_adapter(adapted) if zero3 is not None else adapted.merge_and_unload()
    merged.requires_grad_(True)  # PEFT froze the base for inference; merged, it is a plain model like any loaded one
    merged.config._name_or_path = str(path.resolve())
    return merged, tokenizer, _saved_image_size(path)


def is_model_dir(path: Path) -> bool:
    """A saved model directory or an adapter directory (what `build_or_load` loads by path)."""
    return (path / "config.json").is_file() or (path / ADAPTER_FILE).is_file()


def adapter_base(path: Path) -> str:
    """An adapter directory's base: an absolute directory (stored relative to the adapter, so a tree of
    runs can move as a whole) or a hub id."""
    stored = json.loads((path / ADAPTER_FILE).read_text()).get("base_model_name_or_path") or ""
    local = path / stored
    if stored and local.exists():
        return str(local.resolve())
    if not stored or Path(stored).is_absolute() or stored.startswith("."):
        raise OffsideError(f"{path}: its base model {stored!r} does not exist ({ADAPTER_FILE} base_model_name_or_path)")
    return stored


def adapter_lora(path: Path) -> LoraSpec | None:
    """The rank and scale of an adapter directory's LoRA (on the language model), or None for a full model."""
    if not (path / ADAPTER_FILE).is_file():
        return None
    config = json.loads((path / ADAPTER_FILE).read_text())
    return LoraSpec(r=config["r"], alpha=config["lora_alpha"])


def _saved_image_size(path: Path) -> int:
    meta = path / META_FILE
    return json.loads(meta.read_text())["image_size"] if meta.exists() else REAL_IMAGE_SIZE


def apply_lora(model, lora: LoraSpec, seed: int = 0):
    """The model with LoRA adapters; their initial weights depend on `seed` only, and the caller's
    random state is left as it was."""
    from peft import LoraConfig, get_peft_model

    unknown = sorted(set(lora.groups) - set(LORA_GROUPS))
    if unknown:
        raise OffsideError(f"lora.groups: unknown group(s) {unknown} (valid: {', '.join(LORA_GROUPS)})")
    pattern = "|".join(_group_pattern(model, lora, group) for group in lora.groups)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Adapters in the model's dtype (peft would upcast them to fp32): DeepSpeed's bf16 mode keeps
        # fp32 master weights in the optimizer anyway, and one dtype per model is what model.dtype says.
        return get_peft_model(model, config, autocast_adapter_dtype=False)


def _group_pattern(model, lora: LoraSpec, group: str) -> str:
    """The regex of the group's target modules, checked here so that a bad target is named in our terms
    rather than peft's."""
    regex, key = LORA_GROUPS[group]
    targets = getattr(lora, key)
    pattern = regex.format(targets="|".join(map(re.escape, targets)))
    matched = [(name, module) for name, module in model.named_modules() if re.fullmatch(pattern, name)]
    if not matched:
        raise OffsideError(f"lora group {group!r}: lora.{key} {targets} matches no module")
    for name, module in matched:
        if not isinstance(module, torch.nn.Linear):
            kind = type(module).__name__
            raise OffsideError(f"lora group {group!r}: lora.{key} {targets} matches {name} ({kind}), not a Linear layer")
    return f"(?:{pattern})"


def save(model, processor: Processor, out_dir: Path, merge: bool = False) -> None:
    """Saves what loads by path. A LoRA model whose base is a saved model (or adapter) directory saves
    its adapter only (MBs where a merged 7B model is 15 GB) unless `merge`; otherwise the full model
    (LoRA merged, which changes `model` in place)."""
    base = _trained_on(model)
    if base and not merge:
        local = Path(base).exists()
        model.peft_config["default"].base_model_name_or_path = os.path.relpath(base, out_dir.resolve()) if local else base
        model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)  # never adapted
    else:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(out_dir, safe_serialization=True)
    processor.tokenizer.save_pretrained(out_dir)
    (out_dir / META_FILE).write_text(json.dumps({"image_size": processor.image_size}, indent=2) + "\n")


def gathered_for_save(model):
    """A context in which the ZeRO-3 partitions of what `save` writes (the adapters, or every weight)
    are whole on every rank. A collective: every rank enters it. A no-op for a model not under ZeRO-3."""
    import deepspeed

    adapter_only = bool(_trained_on(model))
    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad or not adapter_only])


def _trained_on(model) -> str | None:
    """What a LoRA model's adapters were put on (an absolute directory or a hub id); None for a plain
    model or the tiny model built from scratch, which is nowhere to load from."""
    if not hasattr(model, "peft_config"):
        return None
    return model.get_base_model().config._name_or_path or None
