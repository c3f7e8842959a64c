"""The one DeepSpeed-backed training loop. Fine-tuning, unlearning and relearning all run through
`train`; what differs is the objective (a loss over named data streams) and the data.

Data: the objective names its streams, e.g. ("forget", "retain"). The first stream sets the epoch:
each step takes `batch_size` rows of it, and `batch_size * retain_ratio` rows of every other stream
(cycled), so retain:forget = 3:1 by default. Schedules are sized in optimizer steps.

Distribution: works alone (sets up a world of one with gloo, or nccl on GPU) and under a launcher or
Ray Train that has already initialised torch.distributed; each rank takes its shard of every stream.
Every collective goes through `offside.engine.comm`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from offside.config import deep_merge
from offside.engine import comm
from offside.engine.losses import TOKEN_COUNTS
from offside.engine.spec import SCHEDULES, TrainSpec  # noqa: F401  (TrainSpec: re-exported)
from offside.errors import OffsideError
from offside.models.processor import Processor, augment

class Objective:
    """A loss over one batch of each named stream. Methods in offside/unlearn subclass this."""

    streams: tuple[str, ...] = ("forget",)

    def loss(self, model, batches: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def setup(self, model, device: torch.device) -> None:
        """Hook for extra state (e.g. a frozen reference model); called once before training."""

    def rewrites(self) -> dict[str, tuple[str, Callable[[dict], dict]]]:
        """Extra batches made from another stream's rows: {name: (source stream, row → row)}, e.g. the
        forget questions with a refusal as the answer. They share the source batch's rows."""
        return {}

    def state_dict(self) -> dict:
        """What a resumed run needs besides the weights and optimizer (saved with each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` when a run resumes."""


EpochCallback = Callable[[int, Any, dict[str, float]], dict[str, float] | None]


@dataclass
class TrainResult:
    epochs_run: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def lr_lambda(spec: TrainSpec, total_steps: int) -> Callable[[int], float]:
    warmup = int(round(spec.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if spec.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def ensure_distributed() -> None:
    """Reuse a process group set up by a launcher / Ray Train (or its RANK/WORLD_SIZE environment);
    otherwise make a private world of one on a free loopback port, without exporting RANK or
    MASTER_PORT, so child processes do not mistake it for a launcher's. Under NCCL the rank's GPU is
    made the current CUDA device (what object collectives and DeepSpeed's engine use)."""
    import deepspeed

    if not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it; harmless without RANK
            deepspeed.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
            )
    comm.backend_device()


def is_main_rank() -> bool:
    """Rank 0 of the process group, or a process outside one: the one that writes and logs."""
    return comm.rank() == 0


def launched() -> bool:
    """Started by a launcher (torchrun, deepspeed, Ray Train) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_main_rank(value: Any) -> Any:
    """Rank 0's `value` on every rank of the process group (a collective), or `value` alone."""
    return comm.broadcast_object(value, src=0)


class _Stream:
    """One rank's shard of a dataset, reshuffled each epoch with a seed shared by all ranks."""

    def __init__(self, rows: list[dict], seed: int, rank: int, world: int):
        if not rows:
            raise OffsideError("training stream is empty")
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world

    def order(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)).tolist()
        per_rank = math.ceil(len(perm) / self.world)
        perm = (perm * 2)[: per_rank * self.world]  # wrap so every rank gets as many rows
        return perm[self.rank :: self.world]


def _batches(stream: _Stream, epoch: int, size: int, count: int):
    order = stream.order(epoch)
    for i in range(count):
        yield [stream.rows[order[(i * size + j) % len(order)]] for j in range(size)]


def train(
    model,
    processor: Processor,
    objective: Objective,
    streams: dict[str, list[dict]],
    spec: TrainSpec,
    checkpoint_dir: Path | None = None,
    callbacks: list[EpochCallback] = (),
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    if spec.schedule not in SCHEDULES:
        raise OffsideError(f"train.schedule: unknown schedule {spec.schedule!r} (valid: {', '.join(SCHEDULES)})")
    missing = [s for s in objective.streams if s not in streams]
    if missing:
        raise OffsideError(f"objective needs data streams {missing}, got {sorted(streams)}")
    import deepspeed

    check_engine_device(next(model.parameters()).device)
    ensure_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(spec.seed)
    shards = {name: _Stream(streams[name], spec.seed, rank, world) for name in objective.streams}
    primary = objective.streams[0]
    sizes = {name: spec.batch_size * (1 if name == primary else spec.retain_ratio) for name in objective.streams}
    # Epochs end on an optimizer step (the last one wraps round the shard), so an epoch checkpoint
    # never holds half-accumulated gradients and a resumed run is the uninterrupted one.
    steps_per_epoch = math.ceil(len(shards[primary].order(0)) / (spec.batch_size * spec.grad_accum))
    total_steps = max(1, steps_per_epoch * spec.epochs)
    if spec.max_steps:
        total_steps = min(total_steps, spec.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
    if spec.gradient_checkpointing:
        checkpoint_activations(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(spec, next(model.parameters()).dtype),
    )
    objective.setup(engine.module, engine.device)
    hooks = _vision_in_every_forward(engine.module) if spec.zero_stage == 3 else []
    start_epoch = _resume(engine, checkpoint_dir, objective) if resume and checkpoint_dir else 0

    result = TrainResult(epochs_run=0, steps=engine.global_steps)
    for epoch in range(start_epoch, spec.epochs):
        if spec.max_steps and engine.global_steps >= spec.max_steps:
            break
        engine.train()
        aug_rng = random.Random(f"{spec.seed}-{epoch}-{rank}")
        iterators = {name: _batches(shards[name], epoch, sizes[name], steps_per_epoch * spec.grad_accum)
                     for name in objective.streams}
        totals: dict[str, float] = {}
        micro_steps = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{spec.epochs}", disable=not progress or rank != 0, leave=False)
        for _ in bar:
            step = [_micro_batch(iterators, objective, processor, spec, aug_rng) for _ in range(spec.grad_accum)]
            _count_tokens(step, world)
            for batches in step:
                batches = {name: _to_device(inputs, engine.device) for name, inputs in batches.items()}
                loss, logs = objective.loss(engine, batches)
                engine.backward(loss)
                engine.step()
                for key, value in {"loss": loss.item(), **logs}.items():
                    totals[key] = totals.get(key, 0.0) + value
                micro_steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if spec.max_steps and engine.global_steps >= spec.max_steps:
                break
        logs = _mean_over_ranks({f"train/{k}": v / max(1, micro_steps) for k, v in totals.items()}, world)
        logs.update({"epoch": epoch + 1, "step": engine.global_steps, "lr": scheduler.get_last_lr()[0]})
        if checkpoint_dir is not None:
            _save_checkpoint(engine, checkpoint_dir, epoch, spec.keep_checkpoints, objective)
        engine.eval()
        for callback in callbacks:
            logs.update(callback(epoch + 1, engine.module, logs) or {})
        result.history.append(logs)
        result.epochs_run += 1
    result.steps = engine.global_steps
    engine.eval()
    for hook in hooks:
        hook.remove()
    if spec.gradient_checkpointing:
        checkpoint_activations(model, enable=False)
    return result


def checkpoint_activations(model, enable: bool = True) -> None:
    """Gradient checkpointing of the language layers and vision blocks on (or off again), non-reentrant
    (the variant that works with ZeRO-3's per-module gathers and with frozen inputs). With the
    embeddings frozen (LoRA, a frozen tower) nothing entering the first checkpointed layer requires
    grad; the embeddings' outputs are made to, as PEFT's and transformers' own recipes do."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enable:
        inner.gradient_checkpointing_disable()
        inner.disable_input_require_grads()
        return
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not inner.get_input_embeddings().weight.requires_grad:
        inner.enable_input_require_grads()


def check_engine_device(device: torch.device) -> None:
    """The training engine (DeepSpeed) runs on the device its accelerator names — this rank's GPU
    wherever torch sees one — and moves the model there; a model placed elsewhere is refused rather
    than silently moved."""
    from deepspeed.accelerator import get_accelerator

    engine = torch.device(get_accelerator().current_device_name())
    if device.type != engine.type:
        hint = ("hide the GPUs from this process (CUDA_VISIBLE_DEVICES=) to train on the CPU" if device.type == "cpu"
                else "use model.device: auto")
        raise OffsideError(f"model.device: {device.type} asked for, but the training engine (DeepSpeed) runs on "
                           f"{engine.type} on this host and would move the model there; {hint}")


def _vision_in_every_forward(model) -> list:
    """ZeRO-3 gathers each module's weights with a collective as the forward reaches it, so every rank
    must run the same modules in the same order. A micro-batch without images skips the vision tower,
    and a rank whose micro-batch has images then waits on gathers the other never joins (gloo:
    "Received data size doesn't match expected size"). So in training a batch without images runs the
    tower on one blank 28×28 image right after the token embedding, where a batch with images runs
    it, and adds 0 × its output, so that its backward runs too. Returns the hooks' handles."""
    qwen = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    blank = {}

    def before(module, args, kwargs):
        blank["now"] = module.training and kwargs.get("pixel_values") is None

    def after_embedding(module, args, embedded):
        if not blank.pop("now", False):
            return embedded
        patch = qwen.visual.patch_embed
        pixels = embedded.new_zeros(4, patch.in_channels * patch.temporal_patch_size * patch.patch_size**2)
        grid = torch.tensor([[1, 2, 2]], device=embedded.device)  # 2×2 patches: one merged visual token
        features = qwen.get_image_features(pixels, grid).pooler_output[0]
        return embedded + 0 * features.sum()

    return [qwen.register_forward_pre_hook(before, with_kwargs=True),
            qwen.language_model.embed_tokens.register_forward_hook(after_embedding)]


def deepspeed_config(spec: TrainSpec, dtype: torch.dtype) -> dict:
    """The engine's DeepSpeed config for training weights of `dtype` (ZeRO-3 loading partitions with it too)."""
    if spec.zero_stage not in (0, 1, 2, 3):
        raise OffsideError(f"train.zero_stage must be 0..3, got {spec.zero_stage}")
    config = {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},  # with DeepSpeed's dynamic loss scaling
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _with_deepspeed_file(config, spec.deepspeed) if spec.deepspeed else config


# DeepSpeed keys the engine sets from the stage config; a DeepSpeed file may repeat them, not change them.
ENGINE_DS_KEYS = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
                  "gradient_clipping": "train.max_grad_norm", "zero_optimization.stage": "train.zero_stage",
                  "bf16.enabled": "model.dtype", "fp16.enabled": "model.dtype"}


def _with_deepspeed_file(config: dict, path: str) -> dict:
    try:
        extra = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise OffsideError(f"train.deepspeed: cannot read DeepSpeed config {path}: {err}") from err
    if not isinstance(extra, dict):
        raise OffsideError(f"train.deepspeed: {path} must hold a JSON object")
    for dotted, owner in ENGINE_DS_KEYS.items():
        mine, theirs = _lookup(config, dotted), _lookup(extra, dotted)
        if theirs is not None and theirs != mine:
            raise OffsideError(f"train.deepspeed: {path} sets {dotted}={theirs!r} but the engine sets {mine!r} from {owner}; change {owner} instead")
    return deep_merge(config, extra)


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _micro_batch(iterators: dict, objective: Objective, processor: Processor, spec: TrainSpec,
                 aug_rng: random.Random) -> dict[str, dict[str, torch.Tensor]]:
    """The next micro-batch of every stream (and of the objective's rewrites), encoded."""
    rows = {name: next(it) for name, it in iterators.items()}
    for name, (source, rewrite) in objective.rewrites().items():
        rows[name] = [rewrite(row) for row in rows[source]]
    return {name: _encode(processor, r, spec.augment, aug_rng) for name, r in rows.items()}


def _mean_over_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    """The ranks' mean of each value (every rank logs the same, the global batch's, figures)."""
    if world == 1:
        return values
    means = comm.all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, (means / world).tolist()))


def _count_tokens(step: list[dict[str, dict[str, torch.Tensor]]], world: int) -> None:
    """Stores in every batch of the optimizer step its stream's token counts (`TOKEN_COUNTS`) over the
    whole step, all ranks together, per micro-batch and rank (see `offside.engine.losses`)."""
    names = list(step[0])
    counts = torch.tensor([[sum(int(count(b[n])) for b in step) for count in TOKEN_COUNTS.values()] for n in names],
                          dtype=torch.float64)
    counts = comm.all_reduce_sum(counts) / (world * len(step))
    for batches in step:
        for name, row in zip(names, counts):
            batches[name].update({key: value.float() for key, value in zip(TOKEN_COUNTS, row)})


def _encode(processor: Processor, rows: list[dict], do_augment: bool, rng: random.Random) -> dict:
    images = [row["image"] for row in rows]
    if do_augment:
        images = [augment(im, rng) if im is not None else None for im in images]
    return processor.encode([r["question"] for r in rows], images, [r["answer"] for r in rows]).inputs


def _to_device(inputs: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def _save_checkpoint(engine, root: Path, epoch: int, keep: int, objective: Objective) -> None:
    """The epoch's checkpoint under `root`, holding what trains (a LoRA checkpoint holds the adapters
    and their optimizer state, not the frozen base); every rank keeps its newest `keep` (a trial's
    ranks each write their own root, and a shared root is pruned idempotently)."""
    # The random state, so dropout continues as uninterrupted; the objective's own state.
    state = {"epoch": epoch + 1, "torch_rng": torch.get_rng_state(), "objective": objective.state_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    tag = f"epoch-{epoch + 1:03d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=state, exclude_frozen_parameters=_has_frozen(engine.module))
    if engine.global_rank != 0:
        # DeepSpeed writes `latest` on rank 0 only. A rank resumed from a copy of a trial's merged
        # checkpoint (Ray Train restores every rank from it) would keep the old tag, and its upload into
        # the next merged checkpoint could overwrite rank 0's with a tag since pruned.
        (root / "latest").write_text(tag)
    if keep > 0:
        tags = sorted(p for p in root.glob("epoch-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _has_frozen(module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def _resume(engine, root: Path, objective: Objective) -> int:
    """Loads the latest epoch checkpoint under `root` (and the random state and objective state it was
    taken with); returns the epoch to start from."""
    if not (root / "latest").exists():
        return 0
    _, state = engine.load_checkpoint(str(root), load_module_strict=not _has_frozen(engine.module))
    state = state or {}
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    objective.load_state_dict(state.get("objective", {}))
    return int(state.get("epoch", 0))
