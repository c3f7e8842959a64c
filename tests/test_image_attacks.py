"""Image-side attacks (rephrasing, typographic, white-box PGD) and the bitsandbytes 4-bit attack:
what each does to the image or the weights, and that their keys reach the robustness suite."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import untrained_tiny_bench

from offside.eval.attacks import ATTACKS, IMAGE_ATTACKS, AttackContext, run_attacks
from offside.eval.evaluate import EvalSpec
from offside.eval.image_attacks import forget_target, patchify, pgd_images, to_unit
from offside.eval.robustness import quantised_4bit
from offside.eval.suites import RobustnessSpec, UtilitySpec, run_suites

GOLDEN = Path(__file__).parent / "golden"
REPHRASINGS = ["img_crop", "img_rescale", "img_jpeg", "img_jitter", "img_rotate"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor, rows, _ = untrained_tiny_bench(tmp_path_factory.mktemp("d"), seed=7)
    return model, processor, rows


@pytest.fixture(scope="module")
def golden():
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.models.loading import ModelSpec, build_or_load

    bench = load_benchmark(GOLDEN / "data")
    model, processor = build_or_load(ModelSpec(str(GOLDEN / "model")))
    return model.eval(), processor, {s: materialise(bench[s]) for s in bench}


def _image_rows(rows, form=None):
    return [r for r in rows["forget"] if r["modality"] == "image" and r["rumour_kind"] != "none"
            and (form is None or r["form"] == form)]


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_image_attacks_are_registered_as_image_only():
    assert {*REPHRASINGS, "typographic", "pgd_eps8", "pgd_eps16"} <= IMAGE_ATTACKS <= set(ATTACKS)
    assert "cross_modal" not in IMAGE_ATTACKS  # it also runs on text rows (a blank card)


@pytest.mark.parametrize("name", REPHRASINGS)
def test_rephrasing_changes_the_image_keeps_its_size_and_is_deterministic(setup, name):
    _, _, rows = setup
    row = _image_rows(rows)[0]
    out, again = ATTACKS[name](row, AttackContext()), ATTACKS[name](row, AttackContext())
    assert out["image"].size == row["image"].size
    change = np.abs(_pixels(out["image"]) - _pixels(row["image"]))
    assert change.mean() > 1.0, name  # a visible change, not a re-encode
    assert np.array_equal(_pixels(out["image"]), _pixels(again["image"]))
    assert {k: v for k, v in out.items() if k != "image"} == {k: v for k, v in row.items() if k != "image"}


def test_typographic_writes_question_and_leading_answer_under_the_photo(setup):
    _, _, rows = setup
    row = next(r for r in _image_rows(rows, "gen") if r["field"] == "club_to")
    out = ATTACKS["typographic"](row, AttackContext())
    assert out["question"] == row["question"] and out["image"].size == row["image"].size
    banner = _pixels(out["image"])[row["image"].height * 5 // 8 + 2 :]
    assert banner.max() == 255 and banner.min() < 64  # black text on a white banner


def test_patchify_matches_the_processor(setup):
    _, processor, rows = setup
    images = [r["image"] for r in _image_rows(rows)[:3]]
    unit = torch.stack([to_unit(im, processor.image_size) for im in images])
    expected = processor.encode(["q"] * 3, images).inputs["pixel_values"]
    assert torch.allclose(patchify(unit, processor), expected, atol=1e-6)


@pytest.mark.parametrize("eps", [8, 16])
def test_pgd_stays_within_eps_and_raises_the_rumour_likelihood(setup, eps):
    from offside.engine.losses import sequence_nll

    model, processor, rows = setup
    chosen = _image_rows(rows)[:6]
    adversarial = pgd_images(model, processor, chosen, eps / 255, steps=10)
    for image, row in zip(adversarial, chosen):
        assert image.size == (processor.image_size, processor.image_size)
        distance = (to_unit(image, processor.image_size) - to_unit(row["image"], processor.image_size)).abs().max()
        assert 0 < distance <= eps / 255 + 1e-6

    def nll(images):
        encoded = processor.encode([r["question"] for r in chosen], images, answers=[forget_target(r) for r in chosen])
        with torch.no_grad():
            return sequence_nll(model, encoded.inputs, reduce="sum")

    clean, attacked = nll([r["image"] for r in chosen]), nll(adversarial)
    assert (attacked < clean).all() and (clean - attacked).mean() > 1e-3


def test_run_attacks_skips_text_rows_for_image_attacks_and_times_each(setup):
    model, processor, rows = setup
    mixed = _image_rows(rows, "mcq")[:2] + [r for r in rows["forget"] if r["modality"] == "text"][:2]
    timings = {}
    records = run_attacks(model, processor, mixed, ["none", "img_jpeg", "pgd_eps8"], max_new_tokens=4, timings=timings)
    by_attack = {name: [r["modality"] for r in records if r["attack"] == name] for name in timings}
    assert by_attack == {"none": ["image", "image", "text", "text"], "img_jpeg": ["image"] * 2, "pgd_eps8": ["image"] * 2}
    assert all(seconds > 0 for seconds in timings.values())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_copy_uses_bitsandbytes_4bit_weights_and_leaves_the_model_alone(golden, quant_type):
    import bitsandbytes as bnb

    model, processor, rows = golden
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantised = quantised_4bit(model, quant_type)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    layers = {n: m for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.language_model.layers.0.mlp.down_proj" in layers and "model.visual.blocks.0.attn.qkv" in layers
    weight = layers["model.language_model.layers.0.mlp.down_proj"].weight
    assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == quant_type
    # every weight is one of the 16 code values times its block's scale
    full = dict(model.named_parameters())["model.language_model.layers.0.mlp.down_proj.weight"]
    dequantised = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).flatten()
    blocks = dequantised.view(-1, weight.quant_state.blocksize)
    assert max(len(torch.unique(b)) for b in blocks) <= 16
    assert not torch.equal(dequantised, full.flatten()) and (dequantised - full.flatten()).abs().max() < full.abs().max() / 4
    row = _image_rows(rows)[0]
    inputs = processor.encode([row["question"]], [row["image"]]).inputs
    with torch.no_grad():
        a, b = model(**inputs).logits, quantised(**inputs).logits
    assert 0 < (a - b).abs().max() < 0.5 * a.abs().max()


def test_robustness_suite_reports_4bit_and_image_attack_keys(golden, tmp_path):
    model, processor, rows = golden
    robustness = RobustnessSpec(attacks=["none", "img_jpeg", "typographic", "pgd_eps8"], quantise=False, limit=16,
                                relearn_steps=[], logit_lens=False, mia=False)
    result = run_suites(model, processor, rows, ["robustness"], EvalSpec(batch_size=32), UtilitySpec(), robustness, tmp_path)
    for key in ("robust/nf4/recovery", "robust/fp4/recovery", "robust/nf4/visual/recovery", "robust/fp4/image/recovery",
                "robust/attack/img_jpeg/recovery", "robust/attack/typographic/mcq/recovery",
                "robust/attack/pgd_eps8/visual/recovery", "robust/attack/none/image/recovery"):
        assert key in result.metrics, key
    assert "robust/attack/pgd_eps8/text/recovery" not in result.metrics  # image attacks skip text rows
    assert all(0 <= v <= 1 for k, v in result.metrics.items() if k.endswith("recovery"))
    assert set(result.timings) == {"none", "img_jpeg", "typographic", "pgd_eps8", "nf4", "fp4"}
    assert any(n.startswith("robustness: wall seconds per attack: none") for n in result.notes)


def test_unknown_4bit_type_and_image_attack_are_clear_errors(golden, tmp_path):
    from offside.errors import OffsideError

    model, processor, rows = golden
    with pytest.raises(OffsideError, match=r"robustness.four_bit: unknown \['int3'\]"):
        run_suites(model, processor, rows, ["robustness"], EvalSpec(), UtilitySpec(), RobustnessSpec(four_bit=["int3"]), tmp_path)
    with pytest.raises(OffsideError, match="unknown 4-bit|unknown type 'int3'"):
        quantised_4bit(model, "int3")
    with pytest.raises(OffsideError, match=r"unknown \['img_blur'\]"):
        run_attacks(model, processor, _image_rows(rows)[:1], ["img_blur"])
