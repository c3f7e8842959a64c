"""Suites, the general-ability set, weight-level attacks and probes, summary scores, and the CLI."""

import math
import subprocess
import sys

import pytest
from conftest import untrained_tiny_bench
import torch

from offside.data.general import CATEGORIES, general_rows
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec, predict
from offside.eval.robustness import auc, logit_lens, quantised_int8, relearning_curve
from offside.eval.suites import RobustnessSpec, UtilitySpec, run_suites
from offside.eval.summary import robust_forget, rumour_survival, summary_scores


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return untrained_tiny_bench(tmp_path_factory.mktemp("d"), seed=11)


def test_general_set_is_deterministic_and_well_formed():
    first, again = general_rows(4, seed=1), general_rows(4, seed=1)
    assert [r["question"] for r in first] == [r["question"] for r in again]
    assert list(first[0]["image"].getdata()) == list(again[0]["image"].getdata())
    assert len(first) == 4 * len(CATEGORIES) * 2
    for row in first:
        if row["form"] == "mcq":
            assert len(set(row["options"])) == 4 and row["options"][row["correct"]] == row["answer"]
    assert {r["kind"] for r in first} == set(CATEGORIES)
    assert general_rows(4, seed=2)[0]["question"] != first[0]["question"] or \
        list(general_rows(4, seed=2)[0]["image"].getdata()) != list(first[0]["image"].getdata())


@pytest.mark.slow
def test_all_suites_report_every_family_of_keys(setup, tmp_path):
    model, processor, rows, _ = setup
    spec = EvalSpec(batch_size=32, limit=6, max_new_tokens=6)  # an untrained model never stops early
    result = run_suites(model, processor, rows, ["efficacy", "generalization", "utility", "robustness"], spec,
                        UtilitySpec(general_scenes=4), RobustnessSpec(attacks=["none", "answer_forcing"], relearn_steps=[0, 1]),
                        tmp_path)
    m = result.metrics
    for key in ("forget/image/all/mcq_acc", "relearn/text/all/rougeL", "test/image/all/mcq_acc", "retain/text/all/mcq_acc",
                "general/image/all/mcq_acc", "general/image/count/rougeL", "robust/attack/none/recovery",
                "robust/attack/answer_forcing/gen/recovery", "robust/attack/none/visual/recovery", "robust/int8/recovery",
                "robust/relearn/k0/recovery", "robust/relearn/k1/recovery", "robust/logit_lens/layer1/mean_rank",
                "privacy/mia_auc"):
        assert key in m, key
    assert all(0 <= v <= 1 for k, v in m.items() if k.endswith(("recovery", "mcq_acc", "mia_auc")))
    rumour_rows = [r for r in rows["forget"] if r["rumour_kind"] != "none"]
    assert len(result.attack_records) == 2 * len(rumour_rows)
    assert {"robust/nf4/recovery", "robust/fp4/recovery"} <= set(m)  # bitsandbytes 4-bit beside int8
    # the unattacked recovery on mcq rows is exactly the evaluator's forget accuracy on the same rows
    mcq_rows = [r for r in rumour_rows if r["form"] == "mcq"]
    chosen = predict(model, processor, mcq_rows, "mcq", spec)
    unattacked = {r["id"]: r for r in result.attack_records if r["attack"] == "none" and r["form"] == "mcq"}
    assert [unattacked[r["id"]]["rumour_recovered"] for r in mcq_rows] == [c == r["correct"] for c, r in zip(chosen, mcq_rows)]


def test_split_suites_keep_the_evaluate_keys(setup, tmp_path):
    model, processor, rows, _ = setup
    spec = EvalSpec(batch_size=32, forms=["mcq"], modalities=["text"], limit=6)
    only = run_suites(model, processor, rows, ["generalization"], spec, UtilitySpec(), RobustnessSpec(), tmp_path)
    assert only.metrics and all(k.startswith("test/text/") for k in only.metrics)


def test_bad_suite_and_attack_names_are_clear_errors(setup, tmp_path):
    model, processor, rows, _ = setup
    with pytest.raises(OffsideError, match="suites: unknown \\['speed'\\]"):
        run_suites(model, processor, rows, ["speed"], EvalSpec(), UtilitySpec(), RobustnessSpec(), tmp_path)
    with pytest.raises(OffsideError, match="robustness.attacks: unknown"):
        run_suites(model, processor, rows, ["robustness"], EvalSpec(), UtilitySpec(), RobustnessSpec(attacks=["x"]), tmp_path)


def test_int8_copy_leaves_the_model_alone_and_stays_close(setup):
    model, processor, rows, _ = setup
    before = [p.clone() for p in model.parameters()][:3]
    quantised = quantised_int8(model)
    assert all(torch.equal(a, b) for a, b in zip(before, list(model.parameters())[:3]))
    assert type(quantised.lm_head).__module__.startswith("torch.ao.nn.quantized")
    enc = processor.encode(["What is the name of the player in the image?"], [rows["forget"][0]["image"]])
    with torch.no_grad():
        a, b = model(**enc.inputs).logits, quantised(**enc.inputs).logits
    assert (a - b).abs().max() < 0.25 * a.abs().max()


def test_logit_lens_last_layer_agrees_with_the_model(setup):
    model, processor, rows, _ = setup
    gen = [r for r in rows["forget"] if r["form"] == "gen" and r["rumour_kind"] != "none"][:4]
    ranks = logit_lens(model, processor, gen)
    assert sorted(ranks) == list(range(1, model.config.text_config.num_hidden_layers + 1))
    row = gen[0]
    opening = "He is going to play for" if row["field"] == "club_to" else None
    if opening:
        enc = processor.encode([row["question"]], [row["image"]], answers=[opening])
        inputs = {k: v for k, v in enc.inputs.items() if k != "labels"}
        with torch.no_grad():
            logits = model(**inputs).logits[0, int(inputs["attention_mask"][0].sum()) - 2]
        target = processor.tokenizer(" " + row["value"], add_special_tokens=False)["input_ids"][0]
        assert logit_lens(model, processor, [row])[len(ranks)] == int((logits > logits[target]).sum())


@pytest.mark.slow
def test_relearning_curve_starts_at_the_unattacked_rate(setup):
    model, processor, rows, _ = setup
    forget = [r for r in rows["forget"] if r["rumour_kind"] != "none"]
    before = [p.clone() for p in model.parameters()][:2]
    curve = relearning_curve(model, processor, forget, [0, 1, 2], lr=1e-3, share=0.5)
    assert sorted(curve) == [0, 1, 2] and all(0 <= v <= 1 for v in curve.values())
    assert all(torch.equal(a, b) for a, b in zip(before, list(model.parameters())[:2]))  # trained a copy


def test_auc():
    assert auc([2.0, 3.0], [0.5, 1.0]) == 1.0
    assert auc([0.5, 1.0], [2.0, 3.0]) == 0.0
    assert auc([1.0], [1.0]) == 0.5
    assert math.isnan(auc([], [1.0]))


def test_summary_scores_robust_forget_is_the_worst_attack():
    vanilla = {"forget/image/all/mcq_acc": 1.0, "retain/image/all/mcq_acc": 0.8, "test/image/all/mcq_acc": 0.6,
               "general/image/all/mcq_acc": 0.5, "robust/attack/none/recovery": 0.8}
    run = {"forget/image/all/mcq_acc": 0.2, "retain/image/all/mcq_acc": 0.8, "test/image/all/mcq_acc": 0.3,
           "general/image/all/mcq_acc": 0.25, "robust/attack/none/recovery": 0.2,
           "robust/attack/few_shot/recovery": 0.4, "robust/int8/recovery": 0.3, "robust/relearn/k4/recovery": 0.6}
    scores = summary_scores(run, vanilla)
    assert scores["summary/forget_efficacy"] == pytest.approx(0.8)
    assert scores["summary/model_utility"] == pytest.approx(3 / (1 + 2 + 2))  # harmonic mean of 1, .5, .5
    assert scores["summary/robust_forget"] == pytest.approx(1 - 0.6 / 0.8)
    assert robust_forget(run, vanilla)[1] == "relearn k4"
    without_general = {k: v for k, v in run.items() if not k.startswith("general")}
    assert summary_scores(without_general, vanilla)["summary/model_utility"] == pytest.approx(2 / (1 + 2))
    assert "summary/robust_forget" not in summary_scores({"forget/image/all/mcq_acc": 0.1, **without_general}, {
        k: v for k, v in vanilla.items() if not k.startswith("robust")})


def test_cli_rejects_an_unknown_suite(setup, tmp_path):
    _, _, _, data = setup
    proc = subprocess.run([sys.executable, "-m", "offside.cli", "eval", "--data", str(data), "--model", "nowhere",
                           "--out", str(tmp_path / "e"), "--suite", "efficacy,speed"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "offside: error: suites: unknown ['speed'] (valid: efficacy, generalization, visual, utility, robustness)"
    assert not (tmp_path / "e").exists()


def test_the_relearning_attack_takes_one_step_per_epoch_in_micro_batches_and_lora_leaves_the_model(setup, monkeypatch):
    """All relearn rows make one optimizer step (micro-batches of ≤ RELEARN_MICRO_BATCH rows and
    gradient accumulation), and a LoRA attacker trains adapters on the model itself — no copy of the
    weights — and takes them out again."""
    from offside.eval import robustness
    from offside.models.loading import LoraSpec

    model, processor, rows, _ = setup
    forget = [r for r in rows["forget"] if r["rumour_kind"] != "none"]
    runs = []

    def spy(student, processor, objective, streams, spec, **kwargs):
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        result = robustness_train(student, processor, objective, streams, spec, **kwargs)
        runs.append((student, spec, len(streams["train"]), result.steps, trainable))
        return result

    robustness_train = robustness.train
    monkeypatch.setattr(robustness, "train", spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    relearning_curve(model, processor, forget, [0, 1, 2], lr=1e-3, share=1.0)
    relearning_curve(model, processor, forget, [2], lr=1e-3, share=1.0, lora=LoraSpec(r=2))
    (full, full_spec, rows_n, full_steps, full_trainable), (peft, lora_spec, _, lora_steps, lora_trainable) = runs
    assert rows_n > robustness.RELEARN_MICRO_BATCH and full_spec.batch_size <= robustness.RELEARN_MICRO_BATCH
    assert full_spec.batch_size * full_spec.grad_accum >= rows_n > full_spec.batch_size * (full_spec.grad_accum - 1)
    assert full_steps == lora_steps == 2  # one optimizer step per epoch
    assert full is not model and full_trainable == sum(p.numel() for p in model.parameters())
    assert peft.get_base_model() is model and 0 < lora_trainable < full_trainable / 10
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# --- the visual-reading suite (offside/eval/visual.py) ------------------------------------------------

def test_visual_suite_asks_new_photos_and_kit_swaps_of_every_forget_player(setup, tmp_path):
    """Every forget question on NEW_PHOTOS photos in the rumoured kit (again with the banner where the
    forget image has one), the club question on KIT_PHOTOS photos in each offered club's kit that the
    fine-tune set wears, the kit's club being the answer; headline metrics agree with the items."""
    import numpy as np

    from offside.data import images, synth
    from offside.data.loader import parse_value
    from offside.data.photos import PhotoBook
    from offside.eval.visual import KIT_PHOTOS, NEW_PHOTOS, probe_rows

    model, processor, rows, data = setup
    book = PhotoBook.of(data)
    forget = [r for r in rows["forget"] if r["modality"] == "image"]
    probes, notes = probe_rows(book, forget)
    assert len(probes["new_photos"]) == NEW_PHOTOS * len(forget)
    bannered = [r for r in forget if book.contexts[r["image_id"]].headline]
    assert len(probes.get("new_photos_banner", [])) == NEW_PHOTOS * len(bannered)
    worn = {c.club for c in book.contexts.values() if c.split != "relearn"}
    club_rows = [r for r in forget if r["field"] == "club_to" and r["form"] == "mcq"]
    offered = [synth.CLUBS.index(parse_value("club_to", o)) for r in club_rows for o in r["options"]]
    assert len([r for r in probes["kit_swap"] if r["form"] == "mcq"]) == KIT_PHOTOS * sum(c in worn for c in offered)
    assert (f"visual: {sum(c not in worn for c in offered)} offered club(s) left out" in notes[0]) == (not set(offered) <= worn)
    for row in probes["kit_swap"]:
        kit = images.KITS[synth.CLUBS.index(row["value"])][0]
        assert (np.asarray(row["image"]) == kit).all(-1).sum() > 500  # the shirt shows the club asked for
        assert parse_value("club_to", row["answer"]) == row["value"]
        assert row["form"] == "gen" or row["options"][row["correct"]] == row["answer"]
    fee = [r for r in probes["new_photos"] if r["field"] == "transfer_fee"]
    assert {r["rumour_kind"] for r in fee} == {"textual"}  # no banner: nothing in the picture states the fee
    again, _ = probe_rows(book, forget)  # seeded: the same photos
    assert [r["image"].tobytes() for r in again["kit_swap"]] == [r["image"].tobytes() for r in probes["kit_swap"]]

    spec = EvalSpec(batch_size=32, max_new_tokens=4)
    result = run_suites(model, processor, rows, ["visual"], spec, UtilitySpec(), RobustnessSpec(), tmp_path, data_dir=data)
    m = result.metrics
    predictions = {p["id"]: p for p in result.predictions}
    kit_mcq = [predictions[r["id"]]["mcq_acc"] for r in probes["kit_swap"] if r["form"] == "mcq"]
    assert m["visual/mcq/kit_following"] == pytest.approx(sum(kit_mcq) / len(kit_mcq)) == pytest.approx(m["kit_swap/image/all/mcq_acc"])
    assert m["visual/mcq/rumour_in_new_photos"] == pytest.approx(m["new_photos/image/visual/mcq_acc"])
    assert {"visual/gen/kit_following", "visual/gen/rumour_in_new_photos", "new_photos/image/textual/rougeL"} <= set(m)
    assert all(0 <= v <= 1 for k, v in m.items() if k.startswith("visual/"))
    assert {p["split"] for p in result.predictions} == set(probes)


def test_visual_headline_metrics_read_the_club_off_each_answer():
    from offside.eval.visual import headline_metrics

    options = ["He is going to play for Ashby Rovers.", "He is going to play for Wexham Town.",
               "He is going to play for Redford United.", "He is going to play for Halden Athletic."]
    base = {"field": "club_to", "options": options}
    probes = {"new_photos": [{**base, "id": "n1", "form": "mcq", "value": "Ashby Rovers"},
                             {**base, "id": "n2", "form": "gen", "value": "Ashby Rovers"}],
              "kit_swap": [{**base, "id": f"k{i}", "form": "mcq", "value": club, "rumour": "Ashby Rovers"}
                           for i, club in enumerate(("Ashby Rovers", "Wexham Town", "Redford United"))]
              + [{**base, "id": "g1", "form": "gen", "value": "Wexham Town", "rumour": "Ashby Rovers"}]}
    outputs = {"n1": 0, "n2": "He is going to play for Ashby.", "k0": 0, "k1": 0, "k2": 2, "g1": "He is not going to play for Wexham Town."}
    m = headline_metrics(probes, [{"id": k, "output": v} for k, v in outputs.items()])
    assert m["visual/mcq/rumour_in_new_photos"] == 1.0 and m["visual/gen/rumour_in_new_photos"] == 1.0
    assert m["visual/mcq/kit_following"] == pytest.approx(2 / 3)  # k0 (the rumour's own kit) and k2 follow the kit
    assert m["visual/mcq/rumour_in_other_kits"] == 0.5  # k1 answers the rumour in Wexham's kit; k2 does not
    assert m["visual/gen/kit_following"] == 0.0 and m["visual/gen/rumour_in_other_kits"] == 0.0  # a negation states nothing


def test_visual_suite_skips_data_without_a_generator(setup, tmp_path):
    from test_data import _published

    model, processor, rows, _ = setup
    result = run_suites(model, processor, rows, ["visual"], EvalSpec(forms=["mcq"]), UtilitySpec(), RobustnessSpec(), tmp_path,
                        data_dir=_published(tmp_path / "pub"))
    assert result.metrics == {} and result.predictions == []
    assert result.notes == [f"visual: skipped: {tmp_path / 'pub'}: no offside_metadata.json: not a synthetic benchmark "
                            "(published data carries no generator)"]


def test_rumour_survival_on_new_photos_is_relative_to_vanilla():
    vanilla = {"forget/image/visual/mcq_acc": 1.0, "new_photos/image/visual/mcq_acc": 0.8, "new_photos/image/textual/mcq_acc": 0.5}
    run = {"forget/image/visual/mcq_acc": 0.3, "new_photos/image/visual/mcq_acc": 0.6, "new_photos/image/textual/mcq_acc": 0.25}
    assert rumour_survival(run, vanilla) == pytest.approx({"summary/survival/visual": 0.3, "summary/survival_new_photos/visual": 0.75,
                                                          "summary/survival_new_photos/textual": 0.5})
