"""Model zoo: the `tiny` model and real Qwen2.5-VL checkpoints (local path or hub id), one code path.

A saved model directory is what `save_pretrained` writes (safetensors + config + tokenizer) plus
`offside_model.json` (the image size the model was trained with)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from offside.errors import OffsideError
from offside.models.processor import Processor
from offside.models.tiny import TinySpec, build_tiny

META_FILE = "offside_model.json"
REAL_IMAGE_SIZE = 252  # the published 256×256, rounded down to a multiple of 28 (81 visual tokens)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
hf_logging.disable_progress_bar()  # per-shard load/save bars; stages show their own progress

# LoRA target groups: regexes over Qwen2.5-VL module names (`model.language_model...`, `model.visual...`).
LORA_GROUPS = {
    "language": r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({targets})",
    "vision": r"model\.visual\.blocks\.\d+\.(attn|mlp)\.({targets})",
    "projector": r"model\.visual\.merger\.mlp\.\d+",
}


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    groups: list[str] = field(default_factory=lambda: ["language"])


@dataclass
class ModelSpec:
    """`name`: "tiny" (built from scratch), a saved model directory, or a hub id."""

    name: str = "tiny"
    image_size: int | None = None  # None: the saved model's, else 56 for tiny / 252 for real models
    dtype: str = "fp32"
    tiny: TinySpec = field(default_factory=TinySpec)
    lora: LoraSpec | None = None
    freeze_vision: bool = False


def build_or_load(spec: ModelSpec, texts: list[str] | None = None, seed: int = 0):
    """Returns (model, processor). `texts` train the tiny model's tokenizer when spec.name == "tiny"."""
    if spec.dtype not in DTYPES:
        raise OffsideError(f"model.dtype: unknown dtype {spec.dtype!r} (valid: {', '.join(DTYPES)})")
    if not spec.name:
        raise OffsideError("model: a model name or directory is required (--model)")
    if spec.name == "tiny":
        if texts is None:
            raise OffsideError("model 'tiny' is built from scratch and needs training text (use `offside finetune`)")
        model, tokenizer = build_tiny(texts, spec.tiny, seed=seed)
        image_size = spec.image_size or spec.tiny.image_size
    else:
        model, tokenizer, saved_size = _load_pretrained(spec.name, DTYPES[spec.dtype])
        image_size = spec.image_size or saved_size
    model.to(DTYPES[spec.dtype])
    if spec.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    return model, Processor(tokenizer, image_size, model.config.vision_config.spatial_merge_size)


def _load_pretrained(name: str, dtype: torch.dtype):
    path = Path(name)
    if path.exists() and not (path / "config.json").exists():
        raise OffsideError(f"{path}: not a model directory (no config.json)")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise OffsideError(f"cannot load model {name!r}: {err}") from err
    meta = path / META_FILE
    saved_size = json.loads(meta.read_text())["image_size"] if meta.exists() else REAL_IMAGE_SIZE
    return model, tokenizer, saved_size


def apply_lora(model, lora: LoraSpec):
    from peft import LoraConfig, get_peft_model

    unknown = sorted(set(lora.groups) - set(LORA_GROUPS))
    if unknown:
        raise OffsideError(f"lora.groups: unknown group(s) {unknown} (valid: {', '.join(LORA_GROUPS)})")
    targets = "|".join(lora.targets)
    pattern = "|".join(f"(?:{LORA_GROUPS[g].format(targets=targets)})" for g in lora.groups)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=f"^(?:{pattern})$")
    return get_peft_model(model, config)


def save(model, processor: Processor, out_dir: Path) -> None:
    """Saves a plain (merged) model that loads by path like any checkpoint."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.tokenizer.save_pretrained(out_dir)
    (out_dir / META_FILE).write_text(json.dumps({"image_size": processor.image_size}, indent=2) + "\n")
