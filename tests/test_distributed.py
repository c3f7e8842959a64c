"""Issue 14: what several ranks do must not depend on their number (2 gloo ranks on CPU)."""

import os
from pathlib import Path

import pytest
from conftest import run_ranks
import torch
import torch.distributed as dist

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.engine.trainer import TrainSpec, train
from offside.models.loading import ModelSpec, build_or_load
from offside.unlearn import get_method

GOLDEN = "tests/golden"
SALIENCY = {"keep_ratio": 0.05}


def _streams() -> dict[str, list[dict]]:
    bench = load_benchmark(f"{GOLDEN}/data")
    return {s: [r for r in materialise(bench[s]) if r["form"] == "gen"][:8] for s in ("forget", "retain")}


def _saliency_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    method = get_method("mm_saliency", SALIENCY)
    train(model, processor, method, _streams(), TrainSpec(epochs=1, batch_size=2, retain_ratio=1, lr=1e-3, warmup_ratio=0.0),
          progress=False)
    torch.save(method.state_dict()["masks"], Path(out) / f"masks{rank}.pt")
    dist.destroy_process_group()


def test_saliency_ranks_choose_one_mask_of_the_keep_ratio(tmp_path):
    """Each rank scores saliency on its own batch; the gradients are averaged before choosing, so all
    ranks update the same entries and the updated share is the keep ratio, not up to world × it."""
    run_ranks(_saliency_worker, tmp_path)
    first, second = (torch.load(tmp_path / f"masks{r}.pt") for r in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    kept = sum(int(m.sum()) for m in first.values()) / sum(m.numel() for m in first.values())
    assert kept == pytest.approx(SALIENCY["keep_ratio"], abs=0.005)


def test_a_resumed_saliency_run_keeps_its_mask(tmp_path):
    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    spec = TrainSpec(epochs=2, batch_size=2, retain_ratio=1, lr=1e-3, warmup_ratio=0.0)
    first = get_method("mm_saliency", SALIENCY)

    def stop(epoch, *_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, processor, first, _streams(), spec, checkpoint_dir=tmp_path, callbacks=[stop], progress=False)
    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    resumed = get_method("mm_saliency", SALIENCY)
    train(model, processor, resumed, _streams(), spec, checkpoint_dir=tmp_path, resume=True, progress=False)
    masks, kept = first.state_dict()["masks"], resumed.state_dict()["masks"]
    assert masks.keys() == kept.keys() and all(torch.equal(masks[n], kept[n]) for n in masks)


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from offside.eval import evaluate as evaluation
    from offside.eval.evaluate import EvalSpec

    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    bench = load_benchmark(f"{GOLDEN}/data")
    rows = {s: materialise(bench[s]) for s in ("forget", "retain")}
    spec = EvalSpec(splits=["forget", "retain"], limit=7, max_new_tokens=8)  # 7 rows: ranks do 4 and 3
    predicted = []
    predict = evaluation.predict

    def counted(model, processor, rows, form, spec):
        predicted.append(len(rows))
        return predict(model, processor, rows, form, spec)

    evaluation.predict = counted
    split, _ = evaluation.evaluate(model, processor, rows, spec, progress=False, across_ranks=True)
    mine = sum(predicted)
    alone, _ = evaluation.evaluate(model, processor, rows, spec, progress=False) if rank == 0 else ({}, [])
    with open(Path(out) / f"eval{rank}.json", "w") as f:
        json.dump({"split": split, "alone": alone, "predicted": mine, "total": sum(predicted) - mine}, f)
    dist.destroy_process_group()


def test_evaluation_split_across_ranks_gives_one_ranks_metrics_for_half_the_work(tmp_path):
    import json

    run_ranks(_eval_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(2)]
    alone = ranks[0]["alone"]
    assert ranks[0]["split"] == ranks[1]["split"]  # every rank has the gathered result
    assert ranks[0]["split"].keys() == alone.keys()
    for key, value in alone.items():  # batch composition differs; a flipped choice would move by 1/7
        assert ranks[0]["split"][key] == pytest.approx(value, abs=1e-6), key
    total = ranks[0]["total"]
    assert ranks[0]["predicted"] + ranks[1]["predicted"] == total and max(r["predicted"] for r in ranks) <= total / 2 + 8
