"""Leaderboard intervals: Student's t over seeds, a bootstrap over items for one run."""

import math

import pytest

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
