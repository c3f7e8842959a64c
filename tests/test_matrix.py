"""The method matrix and the scenarios on the committed golden benchmark and vanilla model
(tests/golden: 2 players, the tiny model trained 15 epochs): rows appear with their metrics,
relearning rows carry the unlearned model's metrics too, a failing cell is a reported row, and
impossible requests fail before any training. The 3-seed findings run (slow) uses the quickstart's."""

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from offside.cli import main
from offside.config import deep_merge, from_dict
from offside.errors import OffsideError
from offside.eval.attacks import ATTACKS, IMAGE_ATTACKS
from offside.matrix import MatrixConfig, run_matrix, validate
from offside.recipes import recipe_config
from offside.report.findings import findings, render

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_EVAL = json.loads((GOLDEN / "eval.json").read_text())  # the golden model's committed evaluation


def _config(out, data=GOLDEN / "data", model=GOLDEN / "model", **extra):
    # The golden model is trained 15 epochs on 2 players, where the vanilla check's chance is 0.66: it
    # sits at the check's threshold, so the plumbing tests allow it (the check has its own tests).
    base = {"data": str(data), "model": str(model), "out": str(out), "eval": {"forms": ["mcq"]}, "allow_untrained": True}
    return from_dict(MatrixConfig, deep_merge(deep_merge(recipe_config("tiny"), base), extra), "test")


def test_matrix_rows_relearning_and_a_failed_cell(tmp_path):
    # relearning at the relearn stage test's 1e-3: 2 players' relearn set is 7 steps an epoch
    config = _config(tmp_path / "m", methods=["ga", "mm_saliency"], scenarios=["complete", "relearning"], relearn={"lr": 1e-3},
                     method_args={"mm_saliency": {"part": "vision"}})  # the vision tower is frozen: this cell fails
    rows = run_matrix(config, progress=False)
    on_disk = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [r["name"] for r in on_disk] == ["vanilla", "ga-complete", "ga-relearning", "mm_saliency-complete", "mm_saliency-relearning"]
    assert [r["name"] for r in rows] == [r["name"] for r in on_disk]
    vanilla, complete, relearning = on_disk[:3]
    # the vanilla model's own evaluation leads the table; rumour survival is relative to it
    assert vanilla["eval_dir"].endswith("eval-vanilla") and vanilla["metrics"]["summary/survival/visual"] == 1.0
    for kind in ("visual", "textual"):
        key = f"forget/image/{kind}/mcq_acc"
        assert complete["metrics"][f"summary/survival/{kind}"] == pytest.approx(complete["metrics"][key] / vanilla["metrics"][key])
    assert vanilla["metrics"]["forget/image/all/mcq_acc"] == pytest.approx(GOLDEN_EVAL["forget/image/all/mcq_acc"])
    assert complete["metrics"]["forget/image/all/mcq_acc"] < vanilla["metrics"]["forget/image/all/mcq_acc"]
    assert "forget/image/visual/mcq_acc" in complete["metrics"] and "forget/image/textual/mcq_acc" in complete["metrics"]
    # the unlearned half of the relearning cell is the complete cell's model (same seed, same data)
    assert relearning["unlearned_metrics"] == pytest.approx(complete["metrics"])
    # relearning teaches the true transfer: relearn-set accuracy rises from its unlearned level
    assert relearning["metrics"]["relearn/image/all/mcq_acc"] > relearning["unlearned_metrics"]["relearn/image/all/mcq_acc"] + 0.2
    for failed in on_disk[3:]:
        assert "no trainable parameters" in failed["error"] and "metrics" not in failed
    table = (tmp_path / "m" / "leaderboard.md").read_text()
    assert "| mm_saliency-complete | mm_saliency | complete | failed: OffsideError" in table
    # one seed: a bootstrap interval over the items, about the binomial half-width 1.96·√(p(1−p)/n)
    questions = 2 * 14  # forget image questions of 2 players
    p = complete["metrics"]["forget/image/all/mcq_acc"]
    binomial = 1.96 * math.sqrt(max(p * (1 - p), 1 / questions) / questions)
    assert 0.5 * binomial < complete["intervals"]["forget/image/all/mcq_acc"] < 1.5 * binomial and "items (bootstrap)" in table


def test_seeds_give_means_with_intervals(tmp_path):
    from offside.report.intervals import t95

    assert main(["matrix", "--data", str(GOLDEN / "data"), "--model", str(GOLDEN / "model"), "--allow-untrained",
                 "--out", str(tmp_path / "m"), "--recipe", "tiny", "--methods", "ga", "--scenarios", "complete",
                 "--seeds", "2", "--set", "eval.forms=[mcq]"]) == 0
    _, row = json.loads((tmp_path / "m" / "results.json").read_text())
    assert row["seeds"] == 2 and [r["seed"] for r in row["runs"]] == [0, 1]
    assert [json.loads((tmp_path / "m" / f"ga-complete-seed{s}" / "manifest.json").read_text())["seed"] for s in (0, 1)] == [0, 1]
    key = "forget/image/all/mcq_acc"
    values = [r["metrics"][key] for r in row["runs"]]
    assert row["metrics"][key] == pytest.approx(sum(values) / 2)
    assert row["intervals"][key] == pytest.approx(t95(1) * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2))
    first, second = (json.loads((tmp_path / "m" / f"ga-complete-seed{s}" / "metrics.json").read_text()) for s in (0, 1))
    assert first["final/train/loss"] != second["final/train/loss"]  # another data order
    assert f"{row['metrics'][key]:.3f} ± {row['intervals'][key]:.3f}" in (tmp_path / "m" / "leaderboard.md").read_text()


def test_bad_matrix_requests_fail_before_training(tmp_path):
    with pytest.raises(OffsideError, match="unknown key 'betta'"):
        validate(_config(tmp_path / "a", methods=["npo"], method_args={"npo": {"betta": 1}}))
    with pytest.raises(OffsideError, match="unknown scenario"):
        validate(_config(tmp_path / "b", methods=["ga"], scenarios=["partial"]))
    with pytest.raises(OffsideError, match="unknown key 'method_train.ga.lrr'"):
        validate(_config(tmp_path / "c", methods=["ga"], method_train={"ga": {"lrr": 1e-3}}))
    with pytest.raises(OffsideError, match=r"method_train: unknown method\(s\) \['gaa'\]"):
        validate(_config(tmp_path / "d", methods=["ga"], method_train={"gaa": {"lr": 1e-3}}))
    assert not any((tmp_path / name).exists() for name in "abcd")


@pytest.mark.parametrize("scenario", ["selective", "unimodal"])
def test_scenario_selects_its_training_data(tmp_path, scenario):
    out = tmp_path / scenario
    assert main(["unlearn", "--method", "gd", "--scenario", scenario, "--data", str(GOLDEN / "data"), "--model", str(GOLDEN / "model"),
                 "--out", str(out), "--forget-fraction", "0.5", "--set", "train.max_steps=1", "--set", "train.batch_size=4"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["scenario"] == scenario and config["forget_fraction"] == 0.5


def test_unimodal_needs_text_twins(tmp_path, capsys):
    from test_data import _published

    code = main(["unlearn", "--method", "ga", "--scenario", "unimodal", "--data", str(_published(tmp_path / "pub")),
                 "--model", str(GOLDEN / "model"), "--out", str(tmp_path / "o")])
    assert code == 2 and "text-only twins" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_relearn_stage_learns_the_truth_and_evaluates(tmp_path):
    out = tmp_path / "relearned"
    assert main(["relearn", "--model", str(GOLDEN / "model"), "--data", str(GOLDEN / "data"), "--out", str(out),
                 "--lr", "1e-3", "--set", "eval.forms=[mcq]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the vanilla model answers the rumour: relearning the true transfer lifts the relearn set
    assert metrics["relearn/image/all/mcq_acc"] > GOLDEN_EVAL["relearn/image/all/mcq_acc"] + 0.2
    assert metrics["final/epoch"] == 6  # the published 6 epochs


SEEDS = 3
# The robustness suite reduced to the prompt attacks (finding 5); the weight-level attacks cost minutes per model.
PROMPT_ATTACKS_ONLY = {"attacks": [a for a in ATTACKS if a not in IMAGE_ATTACKS], "quantise": False, "four_bit": [],
                       "relearn_steps": [], "logit_lens": False, "mia": False}
ASSERTED = ("1 unimodal fails on the image form", "3 selective spares the shared questions", "4 relearning brings rumours back")


@pytest.mark.manual
def test_tiny_matrix_findings_over_three_seeds(quickstart_run, tmp_path):
    """`--recipe tiny --seeds 3` on the quickstart's vanilla model: every method × scenario, then the
    complete scenario under the prompt attacks (about 60 minutes on 2 quiet cores). Findings 1, 3 and 4
    must hold on their intervals over the seeds across methods, and 1 and 3 be reversed for no method;
    per-method verdicts, 2 and 5 are stated as measured (printed and written to findings.md; README "What the tiny model
    reproduces"). OFFSIDE_FINDINGS_OUT keeps the runs."""
    out = Path(os.environ.get("OFFSIDE_FINDINGS_OUT") or tmp_path)
    qs, _ = quickstart_run
    on_quickstart = {"data": qs / "data", "model": qs / "vanilla", "allow_untrained": False}
    rows = run_matrix(_config(out / "matrix", seeds=SEEDS, **on_quickstart), progress=False)
    attacked = run_matrix(_config(out / "attacks", seeds=SEEDS, scenarios=["complete"], **on_quickstart,
                                  suites=["efficacy", "robustness"], robustness=PROMPT_ATTACKS_ONLY), progress=False)
    assert not [row["name"] for row in rows + attacked if "error" in row]
    result = findings(rows, attacked)
    (out / "findings.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "findings.md").write_text(render(result, SEEDS))
    print(render(result, SEEDS))
    for name in ASSERTED:
        assert result[name]["across"]["verdict"] == "yes", (name, result[name]["across"])
    for name in ASSERTED[:2]:  # and no method reverses 1 or 3; relearning lowers GD's forget accuracy (README)
        assert not [m for m, stat in result[name]["methods"].items() if stat["verdict"] == "reversed"], (name, result[name])
    methods = {row["method"] for row in rows} - {"none"}
    measured = [result["2 visual rumours survive more than textual"], *result["5 prompt attacks recover rumours"].values()]
    assert len(measured) == len(PROMPT_ATTACKS_ONLY["attacks"])  # every attack but the plain query, and finding 2
    assert all(set(stat["methods"]) == methods and stat["across"]["seeds"] == SEEDS for stat in measured)
