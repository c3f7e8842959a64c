"""The engine inside a process group that a launcher already made (as torchrun or Ray Train do):
two gloo ranks, each on its own shard, end with identical weights."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 8 rows / 2 ranks / batch 2, × 2 epochs
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were averaged across ranks
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own shard
