"""The CPU twin of a real checkpoint: a directory that a downloaded Qwen2.5-VL-3B-Instruct looks like to
the code — the published 3B configuration at real width (hidden 2048, MLP 11008, 16 / 2 heads,
vocabulary 151,936 with Qwen's special-token ids; vision hidden 1280, 16 heads, MLP 3420, patch 14,
merge 2, window 112, out 2048), cut to 2 language layers and 2 vision blocks, random weights, saved
with `save_pretrained` in bf16 — loaded through the path a user's checkpoint takes, images at 252×252
(81 visual tokens). Slow: the whole real-scale workflow runs on it (`pytest -m slow tests/test_real_scale.py`)."""

import json
import os
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoTokenizer

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.engine.losses import answer_logits
from offside.engine.trainer import TrainSpec
from offside.eval.evaluate import EvalSpec
from offside.eval.scoring import generate, option_logliks
from offside.models.loading import LoraSpec, ModelSpec, build_or_load
from offside.models.twin import qwen_twin
from offside.stages import EvalConfig, FinetuneConfig, evaluate_model, finetune
from tune_jobs.spec import sweep_from_dict
from tune_jobs.sweep import run_sweep

pytestmark = pytest.mark.slow

GOLDEN_DATA = "tests/golden/data"
LORA_ALL = {"r": 8, "alpha": 16, "dropout": 0.0, "groups": ["language", "vision", "projector"]}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    rows = [r for split in load_benchmark(GOLDEN_DATA).values() for r in materialise(split)]
    path = qwen_twin(root / "qwen2.5-vl-3b-twin", [r[c] for r in rows for c in ("question", "answer")],
                     layers=2, vision_blocks=2)
    ids = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids
    assert [ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>")] == [151643, 151645, 151652, 151655]
    return path


def _forget_rows(n: int) -> list[dict]:
    return [r for r in materialise(load_benchmark(GOLDEN_DATA)["forget"]) if r["form"] == "gen" and r["image"]][:n]


def test_the_twin_loads_as_a_real_checkpoint_does(twin):
    model, processor = build_or_load(ModelSpec(str(twin), dtype="bf16", lora=LoraSpec(**LORA_ALL)))
    assert processor.image_size == 252 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    base = model.get_base_model()
    assert base.model.language_model.embed_tokens.weight.shape == (151936, 2048)
    rows = _forget_rows(2)
    inputs = processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs
    assert (inputs["input_ids"] == 151655).sum(-1).tolist() == [81, 81]
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert any(".visual.blocks.1.attn.qkv" in n for n in adapted) and any(".visual.merger.mlp.2" in n for n in adapted)
    logits, targets = answer_logits(model, inputs)  # only answer positions reach the 151,936-way head
    assert logits.shape[:2] == targets.shape and logits.shape[1] < inputs["input_ids"].shape[1] / 4


def test_finetune_sweep_zero3_eval_and_serve_a_real_width_adapter(twin, tmp_path, local_ray_env):
    """finetune (bf16, LoRA on language + vision + projector) → a sweep trial of NPO under ZeRO-3 on 2
    gloo ranks (the vanilla adapter loaded partitioned and merged layer by layer, gradient
    checkpointing on) → its adapter exported → `offside eval` → the endpoint answers for that adapter."""
    vanilla = finetune(FinetuneConfig(
        data=GOLDEN_DATA, out=str(tmp_path / "vanilla"), model=ModelSpec(str(twin), dtype="bf16", lora=LoraSpec(**LORA_ALL)),
        train=TrainSpec(epochs=1, max_steps=2, batch_size=2, lr=1e-4, warmup_ratio=0.0)), progress=False).run_dir
    assert json.loads((vanilla / "adapter_config.json").read_text())["base_model_name_or_path"] == os.path.relpath(twin, vanilla)
    assert json.loads((vanilla / "manifest.json").read_text())["dtype"] == "bf16"

    sweep = sweep_from_dict({
        "name": "npo-zero3", "storage": str(tmp_path / "tune"), "data": GOLDEN_DATA, "vanilla": str(vanilla),
        "dtype": "bf16", "methods": ["npo"], "lora": LORA_ALL, "num_samples": 1,
        "train": {"epochs": 1, "max_steps": 1, "batch_size": 1, "lr": 1e-4, "warmup_ratio": 0.0, "zero_stage": 3,
                  "gradient_checkpointing": True},
        "search_space": {"train.lr": {"choice": [1e-4]}},
        "resources": {"workers": 2, "cpus_per_worker": 1, "max_concurrent": 1, "local_cpus": 3},
        "epoch_eval": {"splits": ["forget", "retain", "test"], "forms": ["mcq"], "limit": 2},
    })
    result = run_sweep(sweep, verbose=0)
    assert result.complete and result.trials[0]["status"] == "TERMINATED"
    best = result.sweep_dir / "best_model"
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == os.path.relpath(vanilla, best)

    spec = EvalSpec(splits=["forget"], modalities=["image"], forms=["gen"], limit=1, max_new_tokens=4)
    evaluated = evaluate_model(EvalConfig(data=GOLDEN_DATA, out=str(tmp_path / "eval"), model=ModelSpec(str(best), dtype="bf16"),
                                          eval=spec, suites=["efficacy"]), progress=False)
    assert json.loads((evaluated.run_dir / "manifest.json").read_text())["model_path"] == str(best)
    prediction = json.loads((evaluated.run_dir / "predictions.jsonl").read_text().splitlines()[0])

    model, processor = build_or_load(ModelSpec(str(best), dtype="bf16"))
    row = next(r for r in materialise(load_benchmark(GOLDEN_DATA)["forget"]) if r["id"] == prediction["id"])
    assert generate(model.eval(), processor, [row["question"]], [row["image"]], batch_size=1, max_new_tokens=4)[0] == prediction["output"]
    mcq = next(r for r in materialise(load_benchmark(GOLDEN_DATA)["forget"]) if r["form"] == "mcq" and r["modality"] == "image")
    merged_logliks = option_logliks(model.eval(), processor, [mcq], batch_size=1)[0]

    from serve.local import start, stop
    from serve.runner import Job, ModelPool
    from serve.settings import load_settings, registry

    args = {"models": {"npo": str(best)}, "data": GOLDEN_DATA, "max_new_tokens": 4, "dtype": "bf16"}
    url = start(args, _free_port(), num_cpus=2, quiet=True)
    try:
        served = [requests.post(f"{url}/v1/probe", timeout=600, json=body).json() for body in (
            {"model": "npo", "max_tokens": 4, "image_id": row["image_id"], "question": row["question"]},
            {"model": "npo", "image_id": mcq["image_id"], "question": mcq["question"], "options": mcq["options"]})]
    finally:
        stop()
    # The replica runs the adapter unmerged on its merged base: in bf16 not bit-equal to the merged model
    # `offside eval` loads, so generation is compared with the replica's own path and scores within bf16.
    pool = ModelPool(registry(load_settings(args)), "bf16", "cpu")
    loaded = {"npo": pool.load("npo")}
    threads = torch.get_num_threads()
    torch.set_num_threads(load_settings(args).torch_threads)  # as the replica: bf16 sums depend on the split
    try:
        assert served[0]["answer"] == pool.run([Job("npo", row["question"], row["image"], None, 4)], loaded)[0]["answer"]
    finally:
        torch.set_num_threads(threads)
    assert all(abs(a - b) < 0.03 * max(1.0, abs(a)) for a, b in zip(merged_logliks, [o["loglik"] for o in served[1]["options"]])), (merged_logliks, served[1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero3_twin_worker(rank: int, world: int, port: int, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, _ = build_or_load(ModelSpec(str(Path(out) / "twin")), train=TrainSpec(zero_stage=3, batch_size=1))
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(out) / "gathered.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"held": held, "total": total, "tied": tied,
                                                             "dtype": str(next(model.parameters()).dtype)}))
    dist.destroy_process_group()


def test_zero3_ranks_load_half_of_the_real_width_twin_each(twin, tmp_path):
    """Item 2 at real width: 2 gloo ranks load the 3B twin (bf16 by default: the checkpoint's own dtype)
    for ZeRO-3, each holding half its weights, the LM head tied to the embedding without partitions of
    its own; gathered, the weights are those a whole load gives."""
    from conftest import run_ranks

    Path(tmp_path / "twin").symlink_to(twin)
    run_ranks(_zero3_twin_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole, _ = build_or_load(ModelSpec(str(twin)))
    gathered = torch.load(tmp_path / "gathered.pt")
    assert gathered.keys() == dict(whole.named_parameters()).keys()
    assert all(torch.equal(gathered[n], p) for n, p in whole.named_parameters())
    total = sum(p.numel() for p in whole.parameters())
    for rank in ranks:
        assert rank["tied"] and rank["dtype"] == "torch.bfloat16" and rank["total"] == total
        assert total / 2 <= rank["held"] <= total / 2 + 2 * len(gathered)
