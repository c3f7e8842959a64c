"""The DeepSpeed engine on CPU: determinism, schedules, checkpoint/resume, ZeRO stages, and the
GA/GD losses checked against their formulas."""

import copy

import pytest
import torch
from PIL import Image

from offside.engine.finetune import FineTune
from offside.engine.losses import sequence_nll, token_nll
from offside.engine.trainer import TrainSpec, lr_lambda, train
from offside.models.loading import ModelSpec, build_or_load
from offside.unlearn import available, get_method
from offside.errors import OffsideError

COLOURS = ["red", "blue", "green", "yellow"]


def _rows(n=4):
    return [
        {"question": "What is the name of the player in the image?", "answer": f"His name is Player {i}.",
         "image": Image.new("RGB", (112, 112), COLOURS[i % 4]) if i % 2 == 0 else None}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def base():
    rows = _rows(8)
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    return build_or_load(ModelSpec("tiny"), texts, seed=0)


def _fit(base, spec, objective=None, streams=None, **kw):
    model, processor = copy.deepcopy(base[0]), base[1]
    result = train(model, processor, objective or FineTune(), streams or {"train": _rows(8)}, spec, progress=False, **kw)
    return model, result


def test_same_seed_same_losses(base):
    spec = TrainSpec(epochs=2, lr=3e-3, batch_size=4, warmup_ratio=0.0)
    _, first = _fit(base, spec)
    _, second = _fit(base, spec)
    assert [h["train/loss"] for h in first.history] == [h["train/loss"] for h in second.history]
    assert first.history[1]["train/loss"] < first.history[0]["train/loss"]
    assert first.steps == 4  # 8 rows / batch 4 × 2 epochs


def test_schedule_in_optimizer_steps():
    factor = lr_lambda(TrainSpec(warmup_ratio=0.1, schedule="cosine"), total_steps=100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5, abs=0.01)
    assert factor(100) == pytest.approx(0.0, abs=1e-6)
    linear = lr_lambda(TrainSpec(warmup_ratio=0.0, schedule="linear"), total_steps=10)
    assert linear(5) == pytest.approx(0.5)


def test_grad_accumulation_counts_optimizer_steps(base):
    _, result = _fit(base, TrainSpec(epochs=2, batch_size=2, grad_accum=2, lr=1e-3))
    assert result.steps == 4  # 8 micro-batches / accumulation 2


def test_accumulated_micro_batches_are_one_batch(base):
    """The token mean is over the optimizer step's rows: 2 micro-batches of 2 rows accumulated give
    the weights of one batch of 4, though the rows' answers differ in length."""
    rows = [{**row, "answer": row["answer"] + " He plays football." * (i % 3)} for i, row in enumerate(_rows(8))]
    one, _ = _fit(base, TrainSpec(epochs=1, lr=3e-3, batch_size=4, warmup_ratio=0.0), streams={"train": rows})
    two, _ = _fit(base, TrainSpec(epochs=1, lr=3e-3, batch_size=2, grad_accum=2, warmup_ratio=0.0), streams={"train": rows})
    # Adam divides by sqrt(v): a weight whose gradient is almost zero moves by float noise that differs
    # with summation order (and CPU capability), so agreement is measured against the step's own size.
    # A per-micro-batch token mean moves weights by a sizeable fraction of a step.
    step = max((a - b).abs().max().item() for a, b in zip(one.parameters(), base[0].parameters()))
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0.01 * step, msg=name)


@pytest.mark.parametrize("lora, accum", [(False, 1), (True, 1), (False, 3)])
def test_checkpoint_each_epoch_and_resume(base, tmp_path, lora, accum):
    """Resuming from the last epoch's checkpoint gives the uninterrupted run's weights; with LoRA the
    checkpoint holds the adapters and their optimizer state, not the frozen base. With 4 micro-batches
    an epoch and accumulation 3, the epoch ends on an optimizer step (the checkpoint holds no half-
    accumulated gradients)."""
    from offside.models.loading import LoraSpec, apply_lora

    if lora:
        base = (apply_lora(copy.deepcopy(base[0]), LoraSpec(r=4), seed=0), base[1])  # dropout 0.05: random state
    spec = TrainSpec(epochs=3, lr=3e-3, batch_size=2 if accum > 1 else 4, grad_accum=accum, warmup_ratio=0.0,
                     keep_checkpoints=1 if lora else 2)
    full_model, full = _fit(base, spec)

    def interrupt(epoch, model, logs):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(base, spec, checkpoint_dir=tmp_path, callbacks=[interrupt])
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == (["epoch-002"] if lora else ["epoch-001", "epoch-002"])
    if lora:
        weights = sum(p.numel() * p.element_size() for p in base[0].parameters())
        saved = sum(f.stat().st_size for f in (tmp_path / "epoch-002").rglob("*") if f.is_file())
        assert saved < weights / 5
    resumed_model, resumed = _fit(base, spec, checkpoint_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [3]  # continues, does not restart
    assert resumed.history[0]["train/loss"] == pytest.approx(full.history[2]["train/loss"], rel=1e-5)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train(base, stage):
    _, result = _fit(base, TrainSpec(epochs=2, lr=3e-3, batch_size=4, zero_stage=stage, warmup_ratio=0.0))
    assert result.history[1]["train/loss"] < result.history[0]["train/loss"]


def test_ga_and_gd_losses_follow_their_formulas(base):
    model, processor = base
    forget, retain = _rows(2), _rows(6)[2:]
    enc = lambda rows: processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs
    batches = {"forget": enc(forget), "retain": enc(retain)}
    with torch.no_grad():
        nll_f, nll_r = token_nll(model, batches["forget"]), token_nll(model, batches["retain"])
        ga, _ = get_method("ga").loss(model, batches)
        gd, _ = get_method("gd").loss(model, batches)
        per_seq = sequence_nll(model, batches["forget"])
    assert ga.item() == pytest.approx(-nll_f.item())
    assert gd.item() == pytest.approx(-0.25 * nll_f.item() + 0.75 * nll_r.item())
    assert per_seq.shape == (2,) and nll_f.item() > 0


def test_gd_pairs_three_retain_rows_per_forget_row(base):
    seen = {}

    class Recorder(type(get_method("gd"))):
        def loss(self, model, batches):
            seen.update({k: v["input_ids"].shape[0] for k, v in batches.items()})
            return super().loss(model, batches)

    _fit(base, TrainSpec(epochs=1, batch_size=2, lr=1e-4), Recorder(), {"forget": _rows(4), "retain": _rows(8)})
    assert seen == {"forget": 2, "retain": 6}


def test_registry():
    assert {"ga", "gd"} <= set(available())
    with pytest.raises(OffsideError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(OffsideError, match="forget_wieght"):
        get_method("gd", {"forget_wieght": 1.0})


def test_augmented_views_keep_size_and_follow_the_seed():
    import random

    from offside.models.processor import augment

    photo = Image.effect_mandelbrot((112, 112), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    views = [augment(photo, random.Random(seed)) for seed in range(8)]
    assert all(v.size == photo.size for v in views)
    assert any(v.tobytes() != photo.tobytes() for v in views) and any(v is photo for v in views)
    assert augment(photo, random.Random(3)).tobytes() == views[3].tobytes()


def test_losses_project_only_the_answer_positions_onto_the_vocabulary(base):
    """Same per-sequence NLL and KL as log-softmax over every position, from logits of a few positions."""
    import torch.nn.functional as F

    from offside.engine.losses import answer_logits, kl_ref_to_theta

    model, processor = base
    rows = _rows(4)
    inputs = processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs
    labels = inputs["labels"]
    with torch.no_grad():
        full = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        logits, targets = answer_logits(model, inputs)
    answered = (labels[:, 1:] != -100).any(0).sum().item()
    assert logits.shape == (4, answered, full.shape[-1]) and answered < labels.shape[1] / 3

    mask = labels[:, 1:] != -100
    every = torch.gather(F.log_softmax(full[:, :-1], -1), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = -(every * mask).sum(-1)
    assert torch.allclose(sequence_nll(model, inputs, reduce="sum").detach(), expected, rtol=1e-5)
    assert (targets != -100).sum() == mask.sum()

    shifted = full + torch.randn_like(full)  # a reference model that disagrees
    ref = shifted[:, :-1][:, (labels[:, 1:] != -100).any(0)]
    log_theta, log_ref = F.log_softmax(full[:, :-1], -1), F.log_softmax(shifted[:, :-1], -1)
    per_position = (log_ref.exp() * (log_ref - log_theta)).sum(-1)
    assert torch.allclose(kl_ref_to_theta(logits, ref, targets), (per_position * mask).sum() / mask.sum(), rtol=1e-5)


def _saved_bytes(model, inputs) -> int:
    """Bytes autograd keeps for the backward pass of one GA loss (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = token_nll(model, inputs)
    loss.backward()
    return sum(seen.values())


def test_gradient_checkpointing_trains_the_same_weights_and_keeps_less():
    """train.gradient_checkpointing (non-reentrant) with LoRA, whose frozen embeddings give the first
    checkpointed layer no input that requires grad: the same run ends with the same adapter weights,
    autograd keeps fewer bytes for the backward pass, and the model is left without checkpointing."""
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.engine.trainer import checkpoint_activations
    from offside.models.loading import LoraSpec

    rows = [r for r in materialise(load_benchmark("tests/golden/data")["forget"]) if r["form"] == "gen"][:4]
    trained = {}
    for flag in (False, True):
        model, processor = build_or_load(ModelSpec("tests/golden/model", lora=LoraSpec(r=4, dropout=0.1)))
        spec = TrainSpec(epochs=1, batch_size=2, lr=1e-3, warmup_ratio=0.0, gradient_checkpointing=flag)
        train(model, processor, get_method("ga"), {"forget": rows}, spec, progress=False)
        assert not model.get_base_model().is_activation_checkpointing
        trained[flag] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    moved = max(w.abs().max().item() for n, w in trained[False].items() if "lora_B" in n)
    assert moved > 0 and all(torch.allclose(trained[True][n], w, atol=1e-6 * max(1.0, moved)) for n, w in trained[False].items())

    inputs = processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs
    plain = _saved_bytes(model.train(), inputs)
    checkpoint_activations(model)
    checkpointed = _saved_bytes(model, inputs)
    assert checkpointed < plain / 2, (checkpointed, plain)
