"""What a sweep's checkpoints will need on its storage, estimated before the first trial.

A trial's checkpoint holds what trains (the engine leaves frozen weights out: with LoRA only the
adapters) and its optimizer state: per trained parameter its weight (the model's dtype; none under
ZeRO-3, where the fp32 partitions stand in), Adam's two fp32 moments, and DeepSpeed's fp32 master
copy when the model is not fp32 or ZeRO ≥ 1 partitions it — times `train.keep_checkpoints` epoch tags
per checkpoint directory. Ray Train keeps each trial's best and latest checkpoint, and writes a new
one before it deletes the one it replaces."""

from __future__ import annotations

import itertools
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from offside.config import from_dict, to_dict
from offside.errors import OffsideError
from tune_jobs.spec import SweepConfig, apply_sample, trial_count

KEPT_PER_TRIAL = 2  # Ray Train's best-scoring checkpoint (num_to_keep=1) and its latest
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 8


@dataclass
class SpaceEstimate:
    trained: int  # parameters a checkpoint holds (the largest over the search space)
    checkpoint: int  # bytes of one trial checkpoint
    total: int  # bytes the sweep's checkpoints need by its end, less what it already holds
    free: int  # bytes free on the storage
    storage: Path

    def summary(self) -> str:
        return (f"its checkpoints need about {_size(self.total)} ({_size(self.checkpoint)} per checkpoint of "
                f"{self.trained:,} trained parameters; each trial keeps {KEPT_PER_TRIAL} and writes one more while "
                f"training) but {self.storage} has {_size(self.free)} free")


def estimate(config: SweepConfig, existing: int = 0) -> SpaceEstimate:
    """`existing`: bytes the sweep's checkpoints already take (a resumed sweep's)."""
    settings = _largest_settings(config)
    trained = max(trained_parameters(config.vanilla, config.freeze_vision, s.get("lora")) for s in settings)
    checkpoint = max(_checkpoint_bytes(trained, config.dtype, s["train"]) for s in settings)
    concurrent = min(config.resources.max_concurrent, trial_count(config))
    total = (trial_count(config) * KEPT_PER_TRIAL + concurrent) * checkpoint + _export_bytes(config, trained)
    storage = _existing_ancestor(Path(config.storage))
    return SpaceEstimate(trained, checkpoint, max(0, total - existing), shutil.disk_usage(storage).free, storage)


def check_space(config: SweepConfig, sweep_dir: Path, refuse: bool) -> SpaceEstimate | None:
    """Warns on stderr, or with `refuse` fails, when the storage has less free space than the sweep's
    checkpoints need (or when that cannot be estimated)."""
    existing = sum(p.stat().st_size for p in (sweep_dir / "trials").rglob("*") if p.is_file()) if (sweep_dir / "trials").exists() else 0
    try:
        found = estimate(config, existing)
    except (OSError, ValueError) as err:  # e.g. a hub model whose config is not cached here
        message = f"sweep {config.name!r}: cannot estimate the space its checkpoints need ({err})"
        if refuse:
            raise OffsideError(message) from err
        print(f"offside: warning: {message}", file=sys.stderr, flush=True)
        return None
    if found.total > found.free:
        message = f"sweep {config.name!r}: {found.summary()}"
        if refuse:
            raise OffsideError(f"{message} (free space, or drop --require-space to start anyway)")
        print(f"offside: warning: {message}; it will fail when the disk fills (then free space and --resume)",
              file=sys.stderr, flush=True)
    return found


def _checkpoint_bytes(trained: int, dtype: str, train: dict) -> int:
    zero = int(train.get("zero_stage", 0))
    weight = 0 if zero == 3 else DTYPE_BYTES[dtype]
    master = 4 if dtype != "fp32" or zero >= 1 else 0
    return trained * (weight + master + ADAM_BYTES) * max(1, int(train.get("keep_checkpoints", 1)))


def _export_bytes(config: SweepConfig, trained: int) -> int:
    """The best model exported at the end: the adapters with LoRA, else the whole model (trained and
    frozen weights alike)."""
    if not config.export_best:
        return 0
    whole = trained if config.lora else trained_parameters(config.vanilla, False, None)
    return whole * DTYPE_BYTES[config.dtype]


def _largest_settings(config: SweepConfig) -> list[dict]:
    """A trial's settings for every combination of the searched LoRA and checkpoint settings (their
    largest value where a range is searched): the estimate takes the largest."""
    base = {"train": to_dict(config.train), "lora": to_dict(config.lora) if config.lora else None}
    dims = {key: _values(dist) for key, dist in config.search_space.items()
            if key.startswith("lora.") or key in ("train.keep_checkpoints", "train.zero_stage")}
    return [apply_sample(base, dict(zip(dims, combo))) for combo in itertools.product(*dims.values())]


def _values(dist: dict) -> list:
    kind, values = next(iter(dist.items()))
    if kind == "randint":
        return [values[1] - 1]
    if kind in ("uniform", "loguniform"):
        return [values[1]]
    return list(values)


def trained_parameters(vanilla: str, freeze_vision: bool, lora: dict | None) -> int:
    """Parameters that train, counted on the vanilla model's architecture built on the meta device
    (no weights are loaded) with the trial's LoRA and freezing applied as a trial applies them."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from offside.models.loading import ADAPTER_FILE, LoraSpec, adapter_base, apply_lora

    path = Path(vanilla)
    config = AutoConfig.from_pretrained(adapter_base(path) if (path / ADAPTER_FILE).is_file() else vanilla)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
        if freeze_vision:
            model.model.visual.requires_grad_(False)
        if lora:
            model = apply_lora(model, from_dict(LoraSpec, lora, "lora"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError
