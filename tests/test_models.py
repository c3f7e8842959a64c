"""Model loading: LoRA target groups, seeded LoRA initialisation, and decoding that ignores a
checkpoint's own generation settings."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import untrained_tiny_bench

from offside.config import from_dict
from offside.errors import OffsideError
from offside.eval.scoring import generate
from offside.models.loading import LoraSpec, ModelSpec, build_or_load, save
from offside.stages import UnlearnConfig

ADAPTED = {  # the modules each group adapts by default on the tiny model (4 language layers, 2 vision blocks)
    "language": {f"model.language_model.layers.{i}.self_attn.{t}" for i in range(4) for t in ("q_proj", "v_proj")},
    "vision": {f"model.visual.blocks.{i}.attn.{t}" for i in range(2) for t in ("qkv", "proj")},
    "projector": {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"},
}
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The untrained tiny model saved to a directory, its training texts, and rows with images."""
    root = tmp_path_factory.mktemp("models")
    model, processor, rows, _ = untrained_tiny_bench(root, seed=3)
    save(model, processor, root / "saved")
    texts = [r[c] for split in rows.values() for r in split for c in ("question", "answer")]
    pictured = [r for r in rows["forget"] if r["image"] is not None][:4]
    return SimpleNamespace(dir=root / "saved", texts=texts, rows=pictured, processor=processor)


def _batch(processor, rows):
    return processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs


def _logits(model, inputs):
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def _adapted(model) -> set[str]:
    return {name.removeprefix(PEFT_PREFIX) for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("groups", [["language"], ["vision"], ["projector"], ["language", "vision", "projector"]])
def test_lora_groups_adapt_their_modules_train_and_save(tiny, groups, tmp_path):
    model, processor = build_or_load(ModelSpec("tiny", lora=LoraSpec(r=4, groups=groups)), tiny.texts)
    assert _adapted(model) == set().union(*(ADAPTED[g] for g in groups))

    inputs = _batch(processor, tiny.rows)
    _logits(model, inputs).float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    lora_b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b_grads) == len(_adapted(model))
    assert all(g is not None and g.abs().sum() > 0 for g in lora_b_grads)

    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()  # adapters now change the output
    model.eval()
    with torch.no_grad():
        adapted_logits = _logits(model, inputs)
        with model.disable_adapter():
            base_logits = _logits(model, inputs)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
    save(model, processor, tmp_path / "merged")
    loaded, _ = build_or_load(ModelSpec(str(tmp_path / "merged")))
    with torch.no_grad():
        assert torch.allclose(_logits(loaded.eval(), inputs), adapted_logits, atol=1e-4)


@pytest.mark.parametrize("lora, message", [
    ({"groups": ["vision"], "vision_targets": ["fc1"]}, r"lora group 'vision'.*\['fc1'\].*matches no module"),
    ({"groups": ["language"], "targets": ["qkv"]}, r"lora group 'language'.*\['qkv'\].*matches no module"),
    ({"groups": ["projector"], "projector_targets": ["1"]}, r"model\.visual\.merger\.mlp\.1 \(GELU\)"),
    ({"groups": ["audio"]}, r"unknown group"),
])
def test_lora_group_without_usable_modules_is_an_offside_error(tiny, lora, message):
    with pytest.raises(OffsideError, match=message):
        build_or_load(ModelSpec(str(tiny.dir), lora=LoraSpec(**lora)))


def test_lora_group_targets_load_from_config():
    lora = {"groups": ["vision", "projector"], "vision_targets": ["qkv", "proj", "up_proj"]}
    config = from_dict(UnlearnConfig, {"model": {"lora": lora}}, "cfg")
    assert config.model.lora.vision_targets == ["qkv", "proj", "up_proj"]
    assert config.model.lora.projector_targets == ["0", "2"] and config.model.lora.targets == ["q_proj", "v_proj"]
    with pytest.raises(OffsideError, match="'model.lora.vision_targets' must be a list"):
        from_dict(UnlearnConfig, {"model": {"lora": {"vision_targets": "qkv"}}}, "cfg")
    with pytest.raises(OffsideError, match="unknown key 'model.lora.group_targets'"):
        from_dict(UnlearnConfig, {"model": {"lora": {"group_targets": {"vision": ["qkv"]}}}}, "cfg")


def _adapter_weights(model_dir, seed: int) -> dict[str, torch.Tensor]:
    lora = LoraSpec(groups=["language", "vision", "projector"])
    model, _ = build_or_load(ModelSpec(str(model_dir), lora=lora), seed=seed)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_lora_init_of_a_loaded_model_follows_the_seed_only(tiny):
    first = _adapter_weights(tiny.dir, seed=1)
    torch.rand(7)  # other work consumes the global RNG between loads
    again = _adapter_weights(tiny.dir, seed=1)
    torch.rand(3)
    state = torch.get_rng_state()
    other = _adapter_weights(tiny.dir, seed=2)
    assert torch.equal(torch.get_rng_state(), state)  # and leaves the caller's random state alone
    assert first.keys() == again.keys() == other.keys() and first
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_greedy_generation_ignores_the_checkpoints_generation_config(tiny, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(tiny.dir, leaky)
    path = leaky / "generation_config.json"
    settings = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.5, "repetition_penalty": 5.0,
                "no_repeat_ngram_size": 1}
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))

    questions, images = [r["question"] for r in tiny.rows], [r["image"] for r in tiny.rows]
    answers = {}
    for name, model_dir in (("clean", tiny.dir), ("leaky", leaky)):
        model, processor = build_or_load(ModelSpec(str(model_dir)))
        assert model.generation_config.repetition_penalty == (5.0 if name == "leaky" else None)
        torch.manual_seed(0)
        answers[name] = generate(model.eval(), processor, questions, images, batch_size=2, max_new_tokens=16)
    assert answers["leaky"] == answers["clean"]
    tokens = processor.tokenizer(answers["clean"], add_special_tokens=False)["input_ids"]
    assert any(len(set(ids)) < len(ids) for ids in tokens)  # so a leaked no_repeat_ngram_size=1 would show
