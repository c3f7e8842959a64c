"""The CPU twin of a real checkpoint: a directory that a downloaded Qwen2.5-VL-3B-Instruct looks like to
the code — the published 3B configuration at real width (hidden 2048, MLP 11008, 16 / 2 heads,
vocabulary 151,936 with Qwen's special-token ids; vision hidden 1280, 16 heads, MLP 3420, patch 14,
merge 2, window 112, out 2048), cut to 2 language layers and 2 vision blocks, random weights, saved
with `save_pretrained` in bf16 — loaded through the path a user's checkpoint takes, images at 252×252
(81 visual tokens). Slow: the whole real-scale workflow runs on it (`pytest -m slow tests/test_real_scale.py`)."""

import json
import os

import pytest
import requests
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.engine.losses import answer_logits
from offside.engine.trainer import TrainSpec
from offside.eval.evaluate import EvalSpec
from offside.eval.scoring import generate
from offside.models.loading import LoraSpec, ModelSpec, build_or_load
from offside.stages import EvalConfig, FinetuneConfig, evaluate_model, finetune
from tune_jobs.spec import sweep_from_dict
from tune_jobs.sweep import run_sweep

pytestmark = pytest.mark.slow

GOLDEN_DATA = "tests/golden/data"
# Qwen2.5-VL's added tokens and their ids (tokenizer_config.json of the published checkpoints).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
FIRST_SPECIAL_ID, VOCAB_ROWS = 151643, 151936
LORA_ALL = {"r": 8, "alpha": 16, "dropout": 0.0, "groups": ["language", "vision", "projector"]}


def qwen_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, padded with never-produced filler tokens so that Qwen's
    special tokens get their published ids (<|endoftext|> 151643 … <|video_pad|> 151656)."""
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(small.to_str())["model"]
    vocab = dict(trained["vocab"]) | {f"<filler_{i}>": i for i in range(len(trained["vocab"]), FIRST_SPECIAL_ID)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(QWEN_SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def qwen_twin(out, texts: list[str]):
    tokenizer = qwen_tokenizer(texts)
    ids = tokenizer.convert_tokens_to_ids
    assert [ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>")] == [151643, 151645, 151652, 151655]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB_ROWS, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 151645, 151643
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    rows = [r for split in load_benchmark(GOLDEN_DATA).values() for r in materialise(split)]
    return qwen_twin(root / "qwen2.5-vl-3b-twin", [r[c] for r in rows for c in ("question", "answer")])


def _forget_rows(n: int) -> list[dict]:
    return [r for r in materialise(load_benchmark(GOLDEN_DATA)["forget"]) if r["form"] == "gen" and r["image"]][:n]


def test_the_twin_loads_as_a_real_checkpoint_does(twin):
    model, processor = build_or_load(ModelSpec(str(twin), dtype="bf16", lora=LoraSpec(**LORA_ALL)))
    assert processor.image_size == 252 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    base = model.get_base_model()
    assert base.model.language_model.embed_tokens.weight.shape == (VOCAB_ROWS, 2048)
    rows = _forget_rows(2)
    inputs = processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs
    assert (inputs["input_ids"] == 151655).sum(-1).tolist() == [81, 81]
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert any(".visual.blocks.1.attn.qkv" in n for n in adapted) and any(".visual.merger.mlp.2" in n for n in adapted)
    logits, targets = answer_logits(model, inputs)  # only answer positions reach the 151,936-way head
    assert logits.shape[:2] == targets.shape and logits.shape[1] < inputs["input_ids"].shape[1] / 4


def test_finetune_sweep_zero3_eval_and_serve_a_real_width_adapter(twin, tmp_path, local_ray_env):
    """finetune (bf16, LoRA on language + vision + projector) → a sweep trial of NPO under ZeRO-3 on 2
    gloo ranks → its adapter exported → `offside eval` → the endpoint answers for that adapter."""
    vanilla = finetune(FinetuneConfig(
        data=GOLDEN_DATA, out=str(tmp_path / "vanilla"), model=ModelSpec(str(twin), dtype="bf16", lora=LoraSpec(**LORA_ALL)),
        train=TrainSpec(epochs=1, max_steps=2, batch_size=2, lr=1e-4, warmup_ratio=0.0)), progress=False).run_dir
    assert json.loads((vanilla / "adapter_config.json").read_text())["base_model_name_or_path"] == os.path.relpath(twin, vanilla)
    assert json.loads((vanilla / "manifest.json").read_text())["dtype"] == "bf16"

    sweep = sweep_from_dict({
        "name": "npo-zero3", "storage": str(tmp_path / "tune"), "data": GOLDEN_DATA, "vanilla": str(vanilla),
        "dtype": "bf16", "methods": ["npo"], "lora": LORA_ALL, "num_samples": 1,
        "train": {"epochs": 1, "max_steps": 1, "batch_size": 1, "lr": 1e-4, "warmup_ratio": 0.0, "zero_stage": 3},
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

    from serve.local import start, stop

    url = start({"models": {"npo": str(best)}, "data": GOLDEN_DATA, "max_new_tokens": 4, "dtype": "bf16"},
                _free_port(), num_cpus=2, quiet=True)
    try:
        row = next(r for r in materialise(load_benchmark(GOLDEN_DATA)["forget"]) if r["id"] == prediction["id"])
        answer = requests.post(f"{url}/v1/probe", timeout=600, json={
            "model": "npo", "max_tokens": 4, "image_id": row["image_id"], "question": row["question"]}).json()["answer"]
    finally:
        stop()
    model, processor = build_or_load(ModelSpec(str(best), dtype="bf16"))
    expected = generate(model.eval(), processor, [row["question"]], [row["image"]], batch_size=1, max_new_tokens=4)[0]
    assert answer == expected == prediction["output"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
