"""Leaderboard intervals: Student's t over seeds, a bootstrap over items for one run."""

import json
import math

import pytest

from offside.cli import main

from offside.report.intervals import over_items, over_seeds, t95


def test_seed_intervals_are_students_t():
    means, widths = over_seeds([{"a": 0.5, "b": 1.0}, {"a": 0.7, "b": 1.0, "c": 3.0}])
    assert means == pytest.approx({"a": 0.6, "b": 1.0})  # only what every run has
    assert widths["a"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert widths["b"] == 0.0
    assert t95(2) == 4.303 and t95(11) == 2.228 and t95(100) == 1.96


def test_one_run_gets_a_bootstrap_interval_over_its_items():
    records = [{"split": "forget", "modality": "image", "form": "mcq", "output": i % 4, "mcq_acc": float(i % 2)}
               for i in range(400)]
    widths = over_items(records)
    assert set(widths) == {"forget/image/all/mcq_acc"}
    # a proportion of 0.5 over 400 items: 1.96 × √(0.25 / 400) ≈ 0.049
    assert widths["forget/image/all/mcq_acc"] == pytest.approx(0.049, abs=0.006)
    assert over_items(records) == widths  # seeded


def _cell(method, scenario, per_seed):
    runs = [{"seed": s, "metrics": m, **({"unlearned_metrics": u} if u else {})} for s, (m, u) in enumerate(per_seed)]
    return {"name": f"{method}-{scenario}", "method": method, "scenario": scenario, "runs": runs}


def test_findings_are_per_seed_differences_with_t_intervals(tmp_path, capsys):
    import math

    from offside.report.findings import FORGET_IMAGE, findings, render

    def acc(values):
        return [({FORGET_IMAGE: v}, None) for v in values]

    rows = [{"name": "vanilla", "method": "none", "scenario": "none", "metrics": {}},
            _cell("ga", "complete", acc([0.40, 0.50, 0.45])), _cell("ga", "unimodal", acc([0.60, 0.66, 0.70])),
            _cell("gd", "complete", acc([0.60, 0.50, 0.55])), _cell("gd", "unimodal", acc([0.50, 0.44, 0.45])),
            _cell("ga", "relearning", [({FORGET_IMAGE: a}, {FORGET_IMAGE: b}) for a, b in ((0.7, 0.4), (0.8, 0.5), (0.9, 0.45))])]
    result = findings(rows)
    unimodal = result["1 unimodal fails on the image form"]
    ga, gd = unimodal["methods"]["ga"], unimodal["methods"]["gd"]
    diffs = [0.20, 0.16, 0.25]  # ga: unimodal − complete, seed by seed
    assert ga["mean"] == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert ga["half_width"] == pytest.approx(t95(2) * sd / math.sqrt(3)) and ga["verdict"] == "yes"
    assert gd["mean"] == pytest.approx((-0.10 - 0.06 - 0.10) / 3) and gd["verdict"] == "reversed"
    across = [(0.20 - 0.10) / 2, (0.16 - 0.06) / 2, (0.25 - 0.10) / 2]  # the methods' mean, seed by seed
    assert unimodal["across"]["mean"] == pytest.approx(sum(across) / 3)
    relearning = result["4 relearning brings rumours back"]
    assert relearning["methods"]["ga"]["mean"] == pytest.approx(0.35) and relearning["across"]["verdict"] == "yes"
    assert result["3 selective spares the shared questions"]["across"] is None  # no selective cells
    table = render(result, 3)
    assert "| 1 unimodal fails on the image form | +0.058 ± " in table and "gd -0.087 ± " in table and "over 3 seeds" in table
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "vanilla_check.json").write_text("{}")  # what `offside matrix` writes before any cell
    assert main(["findings", "--matrix", str(tmp_path)]) == 0 and capsys.readouterr().out.strip() == table.strip()
    assert main(["findings", "--matrix", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
