"""`offside findings` (offside/report/findings.py): one seed decides nothing, finding 2 on the forget
image and on new photos, findings a matrix cannot state are said to be missing, and only a matrix
directory is read."""

import json

import pytest

from offside.cli import main
from offside.errors import OffsideError
from offside.report.findings import FORGET_IMAGE, ONE_SEED, findings, load_matrix, render, seeds_of

SURVIVAL = ("summary/survival/visual", "summary/survival/textual",
            "summary/survival_new_photos/visual", "summary/survival_new_photos/textual")


def _cell(method, scenario, per_seed):
    runs = [{"seed": s, "metrics": m} for s, m in enumerate(per_seed)]
    return {"name": f"{method}-{scenario}", "method": method, "scenario": scenario, "runs": runs} if len(runs) > 1 else \
        {"name": f"{method}-{scenario}", "method": method, "scenario": scenario, **runs[0]}


def _survival(*values):
    return dict(zip(SURVIVAL, values))


VANILLA = {"name": "vanilla", "method": "none", "scenario": "none", "metrics": {}}


def test_one_seed_decides_nothing():
    """One seed has no interval: a positive difference is "undecided (one seed)", never "yes"."""
    rows = [VANILLA, _cell("ga", "complete", [{FORGET_IMAGE: 0.4, **_survival(0.5, 0.3, 0.9, 0.2)}]),
            _cell("ga", "unimodal", [{FORGET_IMAGE: 0.7}])]
    result = findings(rows)
    assert seeds_of(rows) == 1
    unimodal = result["1 unimodal fails on the image form"]
    assert unimodal["across"]["mean"] == pytest.approx(0.3) and unimodal["across"]["half_width"] is None
    assert unimodal["across"]["verdict"] == unimodal["methods"]["ga"]["verdict"] == ONE_SEED
    table = render(result, seeds_of(rows))
    assert "| 2 visual rumours survive more than textual | +0.200 | undecided (one seed) | ga +0.200 |" in table
    assert "| 2 visual rumours survive more than textual, on new photos | +0.700 | undecided (one seed) |" in table
    assert "| yes |" not in table and "One seed: differences without an interval" in table


def test_finding_two_on_the_forget_image_and_on_new_photos_over_seeds():
    rows = [VANILLA,
            _cell("ga", "complete", [_survival(0.50, 0.40, 0.90, 0.30), _survival(0.40, 0.40, 0.80, 0.40), _survival(0.45, 0.35, 0.85, 0.35)]),
            _cell("gd", "complete", [_survival(0.30, 0.50, 0.70, 0.60), _survival(0.20, 0.45, 0.75, 0.50), _survival(0.25, 0.40, 0.80, 0.55)]),
            _cell("kl", "complete", [{FORGET_IMAGE: 0.3}] * 3)]  # evaluated without the survival keys: left out
    result = findings(rows)
    image = result["2 visual rumours survive more than textual"]
    photos = result["2 visual rumours survive more than textual, on new photos"]
    assert set(image["methods"]) == set(photos["methods"]) == {"ga", "gd"}
    assert image["methods"]["ga"]["mean"] == pytest.approx((0.10 + 0.0 + 0.10) / 3)
    assert image["methods"]["gd"]["verdict"] == "reversed"
    assert photos["methods"]["ga"]["mean"] == pytest.approx((0.60 + 0.40 + 0.50) / 3) and photos["methods"]["ga"]["verdict"] == "yes"
    across = [((0.60 + 0.10) / 2), ((0.40 + 0.25) / 2), ((0.50 + 0.25) / 2)]  # per seed, the methods' mean
    assert photos["across"]["mean"] == pytest.approx(sum(across) / 3) and photos["across"]["seeds"] == 3


def test_findings_the_matrix_cannot_state_are_said_to_be_missing():
    rows = [VANILLA, _cell("ga", "complete", [{FORGET_IMAGE: 0.4}] * 2)]
    table = render(findings(rows), 2)
    assert "| 1 unimodal fails on the image form | – | not measured: needs complete and unimodal cells | |" in table
    assert "| 2 visual rumours survive more than textual, on new photos | – | not measured: needs complete cells evaluated with the visual suite" in table
    assert "| 5 prompt attacks recover rumours | – | not measured: needs --attacks" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and "finding" not in line]) == 6


def test_only_a_matrix_directory_is_read(tmp_path, capsys):
    rows = [VANILLA, _cell("ga", "complete", [{FORGET_IMAGE: 0.4, **_survival(0.5, 0.3, 0.9, 0.2)}])]
    quickstart = tmp_path / "quickstart"  # results.json and leaderboard.md, but no matrix written it
    quickstart.mkdir()
    (quickstart / "results.json").write_text(json.dumps(rows))
    with pytest.raises(OffsideError, match="quickstart: not a matrix \\(no vanilla_check.json"):
        load_matrix(quickstart)
    assert main(["findings", "--matrix", str(quickstart)]) == 2
    assert "not a matrix" in capsys.readouterr().err
    matrix = tmp_path / "matrix"
    matrix.mkdir()
    (matrix / "vanilla_check.json").write_text("{}")
    with pytest.raises(OffsideError, match="no results.json"):
        load_matrix(matrix)
    (matrix / "results.json").write_text("{not json")
    with pytest.raises(OffsideError, match="results.json: not valid JSON"):
        load_matrix(matrix)
    (matrix / "results.json").write_text(json.dumps({"rows": rows}))
    with pytest.raises(OffsideError, match="not a matrix's rows"):
        load_matrix(matrix)
    (matrix / "results.json").write_text(json.dumps(rows))
    assert load_matrix(matrix) == rows
    assert main(["findings", "--matrix", str(matrix), "--attacks", str(quickstart)]) == 2  # --attacks too
    assert "not a matrix" in capsys.readouterr().err
    assert main(["findings", "--matrix", str(matrix)]) == 0
    out = capsys.readouterr().out
    assert "undecided (one seed)" in out and "| yes |" not in out
