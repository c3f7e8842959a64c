"""The engine inside a process group that a launcher already made (as torchrun or Ray Train do):
two gloo ranks, each on its own shard, end with identical weights."""

import json
import os
from pathlib import Path

import torch
from conftest import run_ranks
import torch.distributed as dist
from safetensors.torch import load_file


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from test_engine import _rows  # noqa: PLC0415  (spawned process: import after the group exists)

    from offside.engine.finetune import FineTune
    from offside.engine.trainer import TrainSpec, train
    from offside.models.loading import ModelSpec, build_or_load

    rows = _rows(8)
    model, processor = build_or_load(ModelSpec("tiny"), [r["question"] for r in rows] + [r["answer"] for r in rows], seed=0)
    result = train(model, processor, FineTune(), {"train": rows}, TrainSpec(epochs=2, batch_size=2, lr=3e-3), progress=False)
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": result.steps, "checksum": checksum, "world": dist.get_world_size(),
                   "losses": [h["train/loss"] for h in result.history]}, f)
    dist.destroy_process_group()


def test_two_ranks_share_one_model(tmp_path):
    run_ranks(_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 8 rows / 2 ranks / batch 2, × 2 epochs
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were averaged across ranks
    assert ranks[0]["losses"] == ranks[1]["losses"]  # each rank saw its own shard; the logs are the global batch's


def _resuming_worker(rank: int, world: int, port: int, out: str) -> None:
    """As a trial's ranks after a restart: epoch 1 checkpointed into one merged directory, then each rank
    resumes from its own copy of it (Ray Train restores every rank from the merged checkpoint) and
    checkpoints epoch 2 into its own directory."""
    import shutil  # noqa: PLC0415

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from test_engine import _rows  # noqa: PLC0415

    from offside.engine.finetune import FineTune
    from offside.engine.trainer import TrainSpec, train
    from offside.models.loading import ModelSpec, build_or_load

    rows = _rows(8)
    model, processor = build_or_load(ModelSpec("tiny"), [r["question"] for r in rows] + [r["answer"] for r in rows], seed=0)
    merged, own = Path(out) / "merged", Path(out) / f"rank{rank}"
    train(model, processor, FineTune(), {"train": rows}, TrainSpec(epochs=1, batch_size=2), checkpoint_dir=merged, progress=False)
    dist.barrier()
    shutil.copytree(merged, own)
    train(model, processor, FineTune(), {"train": rows}, TrainSpec(epochs=2, batch_size=2), checkpoint_dir=own,
          resume=True, progress=False)
    dist.destroy_process_group()


def test_every_resumed_rank_names_its_newest_checkpoint_as_latest(tmp_path):
    """A rank's checkpoint directory is uploaded into the trial's merged checkpoint, so each one's
    `latest` must name the epoch it just saved, not the one it was restored from."""
    run_ranks(_resuming_worker, tmp_path)
    for rank in range(2):
        own = tmp_path / f"rank{rank}"
        assert (own / "latest").read_text() == "epoch-002", rank
        assert sorted(p.name for p in own.glob("epoch-*")) == ["epoch-002"], rank


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "groups": ["language", "vision"]}


def _zero3_worker(rank: int, world: int, port: int, out: str) -> None:
    """ZeRO-3 with LoRA on the golden model, one row per micro-batch, image and text rows mixed (so one
    rank's batch often has an image when the other's has none): each rank checkpoints into the shared
    directory (as a trial's ranks do into its Ray Train checkpoint); rank 0 records the adapter
    weights, gathered."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed  # noqa: PLC0415

    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.engine.finetune import FineTune
    from offside.engine.trainer import TrainSpec, train
    from offside.models.loading import LoraSpec, ModelSpec, build_or_load

    gen = [r for r in materialise(load_benchmark("tests/golden/data")["forget"]) if r["form"] == "gen"]
    rows = [r for r in gen if r["image"]][:8] + [r for r in gen if not r["image"]][:8]  # ranks' micro-batches differ in modality
    model, processor = build_or_load(ModelSpec("tests/golden/model", lora=LoraSpec(**LORA)))
    spec = TrainSpec(epochs=1, batch_size=1, lr=3e-3, warmup_ratio=0.0, zero_stage=3)
    train(model, processor, FineTune(), {"train": rows}, spec, checkpoint_dir=Path(out) / "checkpoint", progress=False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trained]):
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in trained}, Path(out) / "gathered.pt")
    dist.destroy_process_group()


def test_a_zero3_trial_checkpoint_exports_the_weights_it_trained(tmp_path):
    """ZeRO-3 partitions the weights across the ranks' checkpoint files (there is no
    mp_rank_00_model_states.pt): the sweep's export consolidates them into the trained adapter."""
    from offside.models.loading import ModelSpec, build_or_load
    from tune_jobs.spec import SweepConfig
    from tune_jobs.sweep import export_model

    run_ranks(_zero3_worker, tmp_path)
    assert not list((tmp_path / "checkpoint").rglob("mp_rank_00_model_states.pt"))
    row = {"checkpoint_path": str(tmp_path / "checkpoint"), "trial_id": "t0", "epoch": 1, "objective": 0.0,
           "settings": {"method": "ga", "lora": LORA, "train": {"seed": 0}}}
    config = SweepConfig(name="z3", data="tests/golden/data", vanilla=str(Path("tests/golden/model").resolve()), device="cpu")
    exported = export_model(row, config, tmp_path / "best_model")
    assert (exported / "adapter_config.json").exists()

    gathered = torch.load(tmp_path / "gathered.pt")
    saved = load_file(exported / "adapter_model.safetensors")
    assert len(saved) == len(gathered) and any("lora_B" in n and w.abs().sum() > 0 for n, w in gathered.items())
    for name, weight in gathered.items():
        assert torch.equal(saved[name.replace(".default", "")], weight), name
    build_or_load(ModelSpec(str(exported)))  # and it loads by path, as serve and eval load it
