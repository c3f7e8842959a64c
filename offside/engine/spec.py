"""The training spec: plain settings, importable without torch (the command line checks a config
against it before any heavy library loads). `offside/engine/trainer.py` runs it."""

from __future__ import annotations

from dataclasses import dataclass

from offside.errors import OffsideError

SCHEDULES = ("cosine", "linear", "constant")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class TrainSpec:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 8  # rows of the first stream per micro-batch (per rank)
    retain_ratio: int = 3  # rows of each other stream per row of the first
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    zero_stage: int = 0
    seed: int = 0
    augment: bool = False  # random crop/flip/brightness of training images
    max_steps: int | None = None  # stop after this many optimizer steps (all epochs together)
    keep_checkpoints: int = 1
    deepspeed: str | None = None  # JSON of extra DeepSpeed settings merged over the engine's (e.g. cluster/deepspeed/zero3.json)
    # Recompute each layer's activations in the backward pass instead of keeping them (non-reentrant):
    # less activation memory (bench/memory_twin.py) for about one more forward pass of compute.
    gradient_checkpointing: bool = False


def check_train(spec: TrainSpec, key: str = "train") -> None:
    """The closed sets and ranges of a training spec; `key` names it in the message."""
    if spec.schedule not in SCHEDULES:
        raise OffsideError(f"{key}.schedule: unknown schedule {spec.schedule!r} (valid: {', '.join(SCHEDULES)})")
    if spec.zero_stage not in ZERO_STAGES:
        raise OffsideError(f"{key}.zero_stage: {spec.zero_stage} is not a ZeRO stage (valid: 0, 1, 2, 3)")
