"""Every unlearning method: its loss on hand-made logits/labels against the formula written out here,
and a short real run on a tiny vanilla model that raises the forget-set NLL."""

import math
from types import SimpleNamespace

import pytest
import torch

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.data.synth import generate
from offside.engine.finetune import FineTune
from offside.engine.losses import token_nll
from offside.engine.trainer import TrainSpec, train
from offside.errors import OffsideError
from offside.models.loading import ModelSpec, build_or_load, save
from offside.unlearn import available, get_method

VOCAB, LENGTH = 5, 4


class FixedModel:
    """Stands in for a model in the formula checks: returns hand-made logits (and hidden states) chosen
    by the first token id of each row, so one 'model' serves several hand-made batches."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(8, LENGTH, VOCAB, generator=g)
        self.hidden = torch.randn(8, LENGTH, 3, generator=g)

    def __call__(self, input_ids, output_hidden_states=False, logits_to_keep=None, **_):
        rows = input_ids[:, 0]
        logits = self.logits[rows]  # as transformers' models: logits only at the positions to keep
        out = SimpleNamespace(logits=logits if logits_to_keep is None else logits[:, logits_to_keep])
        if output_hidden_states:
            out.hidden_states = tuple(self.hidden[rows] * (i + 1) for i in range(3))
        return out


def batch(first_ids, answer_from=2):
    """Rows of LENGTH tokens; labels on positions ≥ answer_from (the answer), -100 elsewhere."""
    ids = torch.tensor([[i, 1, 2, 3] for i in first_ids])
    labels = ids.clone()
    labels[:, :answer_from] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def nll_by_hand(logits, inputs):
    """Per-sequence summed NLL and answer length, written out token by token."""
    sums, lengths = [], []
    for row in range(inputs["input_ids"].shape[0]):
        total, count = 0.0, 0
        for t in range(1, LENGTH):
            target = inputs["labels"][row, t].item()
            if target == -100:
                continue
            logp = logits[row, t - 1] - torch.logsumexp(logits[row, t - 1], 0)
            total -= logp[target].item()
            count += 1
        sums.append(total)
        lengths.append(count)
    return sums, lengths


def token_mean(model, inputs):
    sums, lengths = nll_by_hand(model(**inputs).logits, inputs)
    return sum(sums) / sum(lengths)


def logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.fixture
def parts():
    theta, ref = FixedModel(0), FixedModel(1)
    forget, retain, refusal = batch([0, 1]), batch([2, 3, 4, 5, 6, 7][:6]), batch([6, 7])
    return theta, ref, {"forget": forget, "retain": retain, "forget_refusal": refusal}


def _with_ref(method, ref):
    method.reference_model = ref
    return method


def test_ga_gd(parts):
    theta, _, b = parts
    f, r = token_mean(theta, b["forget"]), token_mean(theta, b["retain"])
    assert get_method("ga").loss(theta, b)[0].item() == pytest.approx(-f, rel=1e-5)
    assert get_method("gd").loss(theta, b)[0].item() == pytest.approx(-0.25 * f + 0.75 * r, rel=1e-5)


def test_kl_alternates_and_uses_answer_tokens_only(parts):
    theta, ref, b = parts
    method = _with_ref(get_method("kl"), ref)
    assert method.loss(theta, b)[0].item() == pytest.approx(-token_mean(theta, b["forget"]), rel=1e-5)
    kl_sum, count = 0.0, 0
    lt, lr = theta(**b["retain"]).logits, ref(**b["retain"]).logits
    for row in range(lt.shape[0]):
        for t in range(1, LENGTH):
            if b["retain"]["labels"][row, t] == -100:
                continue
            p_ref = torch.softmax(lr[row, t - 1], 0)
            kl_sum += (p_ref * (torch.log_softmax(lr[row, t - 1], 0) - torch.log_softmax(lt[row, t - 1], 0))).sum().item()
            count += 1
    expected = token_mean(theta, b["retain"]) + 0.1 * kl_sum / count
    assert method.loss(theta, b)[0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("granularity", ["sequence", "batch"])
def test_npo(parts, granularity):
    theta, ref, b = parts
    method = _with_ref(get_method("npo", {"granularity": granularity}), ref)
    s_theta, _ = nll_by_hand(theta(**b["forget"]).logits, b["forget"])
    s_ref, _ = nll_by_hand(ref(**b["forget"]).logits, b["forget"])
    beta = 0.9
    if granularity == "batch":
        s_theta, s_ref = [sum(s_theta) / 2], [sum(s_ref) / 2]
    expected = -(2 / beta) * sum(logsig(beta * (a - c)) for a, c in zip(s_theta, s_ref)) / len(s_theta)
    assert method.loss(theta, b)[0].item() == pytest.approx(expected, rel=1e-5)


def test_po(parts):
    theta, _, b = parts
    expected = token_mean(theta, b["forget_refusal"]) + token_mean(theta, b["retain"])
    assert get_method("po").loss(theta, b)[0].item() == pytest.approx(expected, rel=1e-5)


def test_idk_dpo(parts):
    theta, ref, b = parts
    method = _with_ref(get_method("idk_dpo"), ref)
    c_t, _ = nll_by_hand(theta(**b["forget_refusal"]).logits, b["forget_refusal"])
    c_r, _ = nll_by_hand(ref(**b["forget_refusal"]).logits, b["forget_refusal"])
    r_t, _ = nll_by_hand(theta(**b["forget"]).logits, b["forget"])
    r_r, _ = nll_by_hand(ref(**b["forget"]).logits, b["forget"])
    beta = 0.1
    pref = -sum(logsig(beta * ((c_r[i] - c_t[i]) - (r_r[i] - r_t[i]))) for i in range(2)) / 2
    expected = pref + token_mean(theta, b["retain"])
    assert method.loss(theta, b)[0].item() == pytest.approx(expected, rel=1e-5)


def test_simnpo(parts):
    theta, _, b = parts
    sums, lengths = nll_by_hand(theta(**b["forget"]).logits, b["forget"])
    beta, gamma = 2.5, 0.0
    forget = -(2 / beta) * sum(logsig(beta * s / n - gamma) for s, n in zip(sums, lengths)) / 2
    expected = forget + token_mean(theta, b["retain"])
    assert get_method("simnpo").loss(theta, b)[0].item() == pytest.approx(expected, rel=1e-5)


def test_rmu(parts):
    theta, ref, b = parts
    method = _with_ref(get_method("rmu", {"layer": 1}), ref)
    control = torch.tensor([0.0, 3.0, 4.0])
    method._layer, method._control = 1, control
    h_f = theta(**b["forget"], output_hidden_states=True).hidden_states[1]
    h_r = theta(**b["retain"], output_hidden_states=True).hidden_states[1]
    h_ref = ref(**b["retain"], output_hidden_states=True).hidden_states[1]
    forget = sum(((h_f[i, t] - control) ** 2).sum().item() for i in range(2) for t in range(LENGTH)) / (2 * LENGTH)
    retain = sum(((h_r[i, t] - h_ref[i, t]) ** 2).sum().item() for i in range(6) for t in range(LENGTH)) / (6 * LENGTH)
    assert method.loss(theta, b)[0].item() == pytest.approx(forget + 1200 * retain, rel=1e-5)


def test_unknown_hyperparameter_and_bad_values_fail_before_training():
    with pytest.raises(OffsideError, match="unknown key 'betta'"):
        get_method("npo", {"betta": 1.0})
    with pytest.raises(OffsideError, match="granularity"):
        get_method("npo", {"granularity": "token"})
    with pytest.raises(OffsideError, match="part"):
        get_method("mm_saliency", {"part": "audio"})


# --- short real runs on a tiny vanilla model ----------------------------------------------------

@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    data = generate(root / "bench", players=2, seed=5)
    bench = load_benchmark(data)
    rows = {s: [r for r in materialise(bench[s]) if r["form"] == "gen"] for s in ("forget", "retain")}
    texts = [t for split in bench.values() for c in ("question", "answer") for t in split[c]]
    model, processor = build_or_load(ModelSpec("tiny"), texts)
    train(model, processor, FineTune(), {"train": rows["forget"] + rows["retain"]},
          TrainSpec(epochs=12, lr=3e-3, batch_size=16, weight_decay=0.0), progress=False)
    save(model, processor, root / "vanilla")
    return root / "vanilla", rows


def _forget_nll(model, processor, rows):
    enc = processor.encode([r["question"] for r in rows], [r["image"] for r in rows], [r["answer"] for r in rows]).inputs
    with torch.no_grad():
        return token_nll(model.eval(), enc).item()


@pytest.mark.parametrize("method", sorted(set(available())))
def test_short_run_raises_forget_nll(vanilla, method):
    path, rows = vanilla
    args = {"rmu": {"steering": 20.0, "alpha": 1.0}, "mm_saliency": {"keep_ratio": 0.2}}.get(method, {})
    model, processor = build_or_load(ModelSpec(str(path)))
    before = _forget_nll(model, processor, rows["forget"])
    train(model, processor, get_method(method, args), {"forget": rows["forget"], "retain": rows["retain"]},
          TrainSpec(epochs=1, lr=1e-3, batch_size=8, max_steps=6, warmup_ratio=0.0, schedule="constant"), progress=False)
    assert _forget_nll(model, processor, rows["forget"]) > 1.25 * before  # six steps: forget NLL up ≥ 25 %


def test_saliency_mask_updates_only_the_chosen_part(vanilla):
    path, rows = vanilla
    model, processor = build_or_load(ModelSpec(str(path)))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, processor, get_method("mm_saliency", {"part": "vision", "keep_ratio": 0.1}),
          {"forget": rows["forget"], "retain": rows["retain"]},
          TrainSpec(epochs=1, lr=1e-3, batch_size=8, max_steps=3, weight_decay=0.01), progress=False)
    changed = {n: (p != start[n]).float().mean().item() for n, p in model.named_parameters()}
    vision = [n for n in changed if n.startswith("model.visual.blocks.")]
    assert all(changed[n] == 0 for n in changed if n not in vision)
    updated = sum((model.get_parameter(n) != start[n]).sum().item() for n in vision)
    total = sum(start[n].numel() for n in vision)
    assert 0 < updated <= 0.1 * total + 1


def test_kl_alternates_per_optimizer_step_across_accumulation_and_resume(tmp_path):
    """With gradient accumulation every micro-batch of one optimizer step takes the same branch, and
    a run resumed from a checkpoint continues the alternation."""
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.engine.trainer import TrainSpec, train
    from offside.models.loading import ModelSpec, build_or_load

    bench = load_benchmark("tests/golden/data")
    streams = {s: [r for r in materialise(bench[s]) if r["form"] == "gen"] for s in ("forget", "retain")}
    seen = []

    def run(epochs, resume):
        model, processor = build_or_load(ModelSpec("tests/golden/model"))
        method = get_method("kl")
        loss = method.loss

        def recorded(engine, batches):
            value, logs = loss(engine, batches)
            seen.append((engine.global_steps, "kl" in logs))
            return value, logs

        method.loss = recorded
        spec = TrainSpec(epochs=epochs, batch_size=2, retain_ratio=1, grad_accum=2, lr=1e-4, warmup_ratio=0.0)
        train(model, processor, method, streams, spec, checkpoint_dir=tmp_path / "ckpt", resume=resume, progress=False)

    run(1, False)
    first = len(seen)
    run(2, True)
    steps = {}
    for step, retain in seen:
        steps.setdefault(step, set()).add(retain)
    assert all(len(kinds) == 1 for kinds in steps.values()), steps  # one branch per optimizer step
    assert all(kinds == {step % 2 == 1} for step, kinds in steps.items())
    assert seen[first][0] == seen[first - 1][0] + 1  # the resumed run starts at the next step
