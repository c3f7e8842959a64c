"""Prompt attacks: every registered attack transforms a row and runs through the model on single
rows and batches; recovery is judged per form."""

import pytest
from conftest import untrained_tiny_bench

from offside.errors import OffsideError
from offside.eval.attacks import ATTACKS, IMAGE_ATTACKS, AttackContext, attack, facts_of, question_card, recovered, recovery_rates, run_attacks
from offside.models.processor import Chat

EXPECTED = {"none", "paraphrase", "roleplay", "system_override", "context_priming", "language_es", "few_shot",
            "answer_forcing", "cross_modal"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor, rows, _ = untrained_tiny_bench(tmp_path_factory.mktemp("d"), seed=5)
    return model, processor, rows


def _rumour_rows(rows, form, modality="image"):
    return [r for r in rows["forget"] if r["form"] == form and r["modality"] == modality and r["rumour_kind"] != "none"]


def test_registry_has_the_issue_attacks_and_rejects_duplicates():
    assert EXPECTED <= set(ATTACKS)
    with pytest.raises(ValueError, match="already registered"):
        attack("paraphrase")(lambda row, ctx: row)


def test_each_attack_changes_the_query_and_keeps_the_reference(setup):
    _, _, rows = setup
    row = _rumour_rows(rows, "mcq")[1]  # club_from: priming may name the forget image's club
    context = AttackContext(facts=facts_of(rows["forget"]))
    for name in EXPECTED - {"none"}:
        out = ATTACKS[name](row, context)
        changed = (out["question"] != row["question"] or out.get("system") or out.get("shots") or out.get("prefix")
                   or out["image"] is not row["image"])
        assert changed, name
        assert out["correct"] == row["correct"] and out["id"] == row["id"], name
    forced = ATTACKS["answer_forcing"](row, context)
    assert forced["prefix"] == "He transferred from"
    assert [forced["prefix"] + o for o in forced["options"]] == row["options"]
    primed = ATTACKS["context_priming"](row, context)
    club = context.facts[row["player"], row["image_id"]]["club_to"]
    assert club in primed["question"] and row["value"] not in primed["question"]


def test_chat_layout_puts_system_shots_and_prefix_in_order(setup):
    _, processor, _ = setup
    text = processor.prompt(Chat("Q?", system="S", shots=(("q1", "a1"),), prefix="He is"), has_image=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
                    "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nHe is")
    assert processor.prompt(Chat("Q?"), False) == processor.prompt("Q?", False)


def test_cross_modal_card_writes_the_question_into_the_image(setup):
    _, _, rows = setup
    text_row = _rumour_rows(rows, "gen", "text")[0]
    card = question_card(text_row["question"], None)
    assert card.size == (224, 224)
    assert min(card.convert("L").getdata()) < 64  # black text on white
    attacked = ATTACKS["cross_modal"](text_row, AttackContext())
    assert attacked["image"] is not None and attacked["modality"] == "image"


def test_run_attacks_single_row_and_batch(setup):
    model, processor, rows = setup
    one = run_attacks(model, processor, _rumour_rows(rows, "gen")[:1], names=["none", "answer_forcing"])
    assert [r["attack"] for r in one] == ["none", "answer_forcing"]
    assert {"id", "attack", "form", "answer", "rumour_recovered"} <= set(one[0])
    assert one[1]["answer"].startswith("He is going to play for")
    batch = _rumour_rows(rows, "mcq")[:3] + _rumour_rows(rows, "gen", "text")[:3]
    records = run_attacks(model, processor, batch, max_new_tokens=8)  # the untrained model never stops early
    with_image = [r for r in batch if r["image"] is not None]
    assert len(records) == sum(len(with_image if n in IMAGE_ATTACKS else batch) for n in ATTACKS)
    for rec in records:
        if rec["form"] == "mcq":
            row = next(r for r in batch if r["id"] == rec["id"])
            assert rec["answer"] in row["options"] or rec["attack"] == "answer_forcing"
            assert rec["rumour_recovered"] == (rec["chosen"] == row["correct"])
    rates = recovery_rates(records)
    assert set(rates) == set(ATTACKS) and all(0 <= v <= 1 for v in rates.values())


def test_recovered_uses_the_judge_for_generation(setup):
    _, _, rows = setup
    row = next(r for r in _rumour_rows(rows, "gen") if r["field"] == "transfer_fee")
    assert recovered(row, row["answer"], -1)
    assert not recovered(row, f"The transfer fee was {row['true_value']}.", -1)
    assert not recovered(row, "I do not know the answer.", -1)


def test_unknown_attack_is_a_clear_error(setup):
    model, processor, rows = setup
    with pytest.raises(OffsideError, match="unknown.*'nope'"):
        run_attacks(model, processor, rows["forget"][:1], names=["nope"])
