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
    alone, _ = evaluation.evaluate(model, processor, rows, spec, progress=False, across_ranks=False) if rank == 0 else ({}, [])
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


# World-size invariance: one worker with batch 4 and two workers with batch 2 each train on the same
# global batches (the shards interleave the same permutation) with token means over the global batch.
INVARIANCE = [("ga", {}, 0), ("npo", {}, 0), ("mm_saliency", SALIENCY, 0), ("ga", {}, 2), ("ga", {}, 3)]
GLOBAL_BATCH = 4


def _invariance_spec(world: int, zero_stage: int) -> TrainSpec:
    return TrainSpec(epochs=2, batch_size=GLOBAL_BATCH // world, retain_ratio=1, lr=5e-4, warmup_ratio=0.0,
                     zero_stage=zero_stage, keep_checkpoints=1)


def _train_case(method_name: str, args: dict, zero_stage: int, world: int, checkpoints: Path | None = None):
    """Trains the golden model; returns its weights (gathered under ZeRO-3) and the method."""
    import deepspeed

    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    method = get_method(method_name, args)
    streams = {s: rows * 2 for s, rows in _streams().items()}  # 16 rows: 4 global batches an epoch
    train(model, processor, method, streams, _invariance_spec(world, zero_stage), checkpoint_dir=checkpoints, progress=False)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights, method


def _invariance_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for i, (name, args, zero) in enumerate(INVARIANCE):
        checkpoints = Path(out) / f"checkpoints-rank{rank}" if i == 0 else None  # each rank its own, as in a trial
        weights, method = _train_case(name, args, zero, world, checkpoints)
        if rank == 0:
            torch.save({"weights": weights, "state": method.state_dict()}, Path(out) / f"case{i}.pt")
    dist.destroy_process_group()


def _answers(weights: dict) -> dict[str, list]:
    from offside.eval.evaluate import EvalSpec, evaluate

    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    model.load_state_dict(weights)
    bench = load_benchmark(f"{GOLDEN}/data")
    rows = {s: materialise(bench[s]) for s in ("forget", "retain")}
    _, predictions = evaluate(model, processor, rows, EvalSpec(splits=["forget", "retain"], forms=["mcq"], limit=28), progress=False)
    return {s: [p["output"] for p in predictions if p["split"] == s] for s in ("forget", "retain")}


def test_one_worker_and_two_give_the_same_model(tmp_path):
    """GA, NPO and the saliency method (ZeRO-0), and GA under ZeRO-2 and ZeRO-3 on two workers, against
    one worker under ZeRO-0: weights equal up to the order of float reductions (the all-reduce sums
    in another order than one rank's batch), multiple-choice answers the same but for at most one
    question per split. The two ranks' own checkpoint directories keep one epoch each."""
    run_ranks(_invariance_worker, tmp_path)
    for rank in range(2):
        assert sorted(p.name for p in (tmp_path / f"checkpoints-rank{rank}").glob("epoch-*")) == ["epoch-002"]
    alone = {}
    for i, (name, args, zero) in enumerate(INVARIANCE):
        two = torch.load(tmp_path / f"case{i}.pt")
        if (name, zero) not in alone:
            alone[name, 0] = _train_case(name, args, 0, world=1)
        one_weights, one_method = alone[name, 0]
        moved = max((one_weights[n] - w).abs().max().item() for n, w in build_or_load(ModelSpec(f"{GOLDEN}/model"))[0].named_parameters())
        worst = max((one_weights[n] - w).abs().max().item() for n, w in two["weights"].items())
        assert worst < 0.02 * moved, (name, zero, worst, moved)
        if name == "mm_saliency":
            masks, other = one_method.state_dict()["masks"], two["state"]["masks"]
            agree = sum(int((masks[n] == other[n]).sum()) for n in masks) / sum(m.numel() for m in masks.values())
            assert agree > 0.999, agree
        for split, answers in _answers(one_weights).items():
            differing = sum(a != b for a, b in zip(answers, _answers(two["weights"])[split]))
            assert differing <= 1, (name, zero, split, differing)


def _stage_worker(rank: int, world: int, port: int, out: str) -> None:
    """A stage as torchrun starts it: the launcher's environment, no process group yet."""
    import json

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OFFSIDE_EXPERIMENT="launched")
    torch.set_num_threads(1)
    from offside.eval.evaluate import EvalSpec
    from offside.models.loading import LoraSpec
    from offside.stages import UnlearnConfig, unlearn

    config = UnlearnConfig(data=f"{GOLDEN}/data", out=str(Path(out) / "ga"), method="ga",
                           model=ModelSpec(f"{GOLDEN}/model", lora=LoraSpec(r=4)),
                           train=TrainSpec(epochs=2, lr=3e-3, batch_size=4, warmup_ratio=0.0),
                           epoch_eval=EvalSpec(splits=["forget"], forms=["mcq"], limit=12))
    result = unlearn(config, progress=False)
    with open(Path(out) / f"result{rank}.json", "w") as f:
        json.dump({"run_dir": str(result.run_dir), "run_id": result.run_id, "metrics": result.metrics}, f)


def test_a_launched_stage_is_written_and_logged_by_rank_0_alone(tmp_path):
    """Under torchrun both ranks train and evaluate; one directory and one MLflow run come out, with
    rank 0's result on both ranks."""
    import json

    from mlflow.tracking import MlflowClient

    from offside.tracking import tracking_uri

    run_ranks(_stage_worker, tmp_path)
    first, second = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2))
    assert first == second and first["run_dir"] == str((tmp_path / "ga").resolve())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial directory left
    manifest = json.loads((tmp_path / "ga" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["mlflow_run_id"] == first["run_id"]
    assert not (tmp_path / "ga" / "checkpoints").exists() and (tmp_path / "ga" / "adapter_model.safetensors").exists()
    client = MlflowClient(tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("launched").experiment_id])
    assert [r.info.run_id for r in runs] == [first["run_id"]]
    epochs = client.get_metric_history(first["run_id"], "forget/image/all/mcq_acc")
    assert [m.step for m in epochs] == [1, 2]
    build_or_load(ModelSpec(str(tmp_path / "ga")))
