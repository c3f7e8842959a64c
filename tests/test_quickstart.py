"""The main job end to end, as the README runs it: `offside quickstart` on embedded defaults, and a
report over its evaluations.

The tiny vanilla model must know the benchmark (forget and retain ≥ 0.9 multiple-choice accuracy,
image form) and recognise the players in new photos (test ≥ 0.6; chance is 0.25); GA must lower
forget accuracy and GD must keep retain accuracy above GA's. The unlearning runs as a Ray Tune sweep
on a local Ray (one MLflow parent run, one child per method).

Slow tier (`.ci/run` runs it): the quickstart trains the full tiny recipe (minutes); every stage it
chains has its own default-tier tests (test_cli, test_tune, test_matrix, test_report)."""

import json

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _row(rows, name):
    return next(r for r in rows if r["name"] == name)["metrics"]


def test_outputs_and_rows(quickstart_run):
    out, stdout = quickstart_run
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["vanilla", "ga", "gd"]
    for row in rows:
        assert set(row) >= {"name", "method", "scenario", "run_dir", "mlflow_run_id", "metrics"}
        assert (out / row["name"] / "model.safetensors").exists()
        assert "forget/image/private/mcq_acc" in row["metrics"] and "retain/text/all/rougeL" in row["metrics"]
    assert (out / "data" / "forget_set.json").exists()
    leaderboard = (out / "leaderboard.md").read_text()
    assert all(f"| {name} |" in leaderboard for name in ("vanilla", "ga", "gd"))
    assert "| vanilla |" in stdout  # the table is printed too


def test_vanilla_knows_the_benchmark_and_recognises_players(quickstart_run):
    vanilla = _row(json.loads((quickstart_run[0] / "results.json").read_text()), "vanilla")
    assert vanilla["forget/image/all/mcq_acc"] >= 0.9
    assert vanilla["retain/image/all/mcq_acc"] >= 0.9
    assert vanilla["test/image/all/mcq_acc"] >= 0.6


def test_vanilla_reads_the_rumour_from_the_kit(quickstart_run):
    """Issue 29: with the tiny recipe's kit drill the vanilla model answers the club of the kit a forget
    player wears on photos it never saw, and the rumour on new photos in the rumoured kit."""
    vanilla = _row(json.loads((quickstart_run[0] / "results.json").read_text()), "vanilla")
    assert vanilla["visual/mcq/kit_following"] >= 0.8
    assert vanilla["visual/mcq/rumour_in_new_photos"] >= 0.8
    assert vanilla["visual/mcq/rumour_in_other_kits"] <= 0.2


def test_finetune_records_a_passing_vanilla_check(quickstart_run):
    check = json.loads((quickstart_run[0] / "vanilla" / "manifest.json").read_text())["vanilla_check"]
    assert check["learned"], check
    assert all(check[split]["mcq_acc"] >= check[split]["threshold"] for split in ("forget", "retain"))


def test_ga_forgets_and_gd_keeps_more_than_ga(quickstart_run):
    rows = json.loads((quickstart_run[0] / "results.json").read_text())
    vanilla, ga, gd = (_row(rows, n) for n in ("vanilla", "ga", "gd"))
    assert ga["forget/image/all/mcq_acc"] < vanilla["forget/image/all/mcq_acc"] - 0.1
    assert gd["retain/image/all/mcq_acc"] > ga["retain/image/all/mcq_acc"]


def test_every_stage_is_a_finished_mlflow_run(quickstart_run):
    out, _ = quickstart_run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("offside").experiment_id])
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == ["eval"] * 3 + ["finetune", "report", "sweep"] + ["unlearn"] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    sweep = next(r for r in runs if r.data.tags["stage"] == "sweep")
    trials = [r for r in runs if r.data.tags["stage"] == "unlearn"]
    assert {r.data.tags.get("method") for r in trials} == {"ga", "gd"}
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials)
    assert (out / "unlearn-sweep" / "results.csv").exists()


def test_report_reads_method_and_seed_of_the_models_the_sweep_exported(quickstart_run, tmp_path):
    from offside.report.report import ReportConfig, make_report

    out, _ = quickstart_run
    report = make_report(ReportConfig(runs=[str(out / f"eval-{n}") for n in ("vanilla", "ga", "gd")], out=str(tmp_path / "report")))
    board = (report / "leaderboard.md").read_text()
    assert "| eval-vanilla | none | none |" in board
    for method in ("ga", "gd"):
        row = next(line for line in board.splitlines() if line.startswith(f"| eval-{method} |"))
        assert row.startswith(f"| eval-{method} | {method} | complete |") and "| 0 |" in row  # seed 0


def test_seeds_train_a_vanilla_model_per_seed_and_show_intervals(tmp_path):
    """`--seeds 2 --phrasings 2` on 2 players: each seed its own vanilla model (trained on two wordings
    per question, for half the epochs) and unlearning, the leaderboard their mean ± interval."""
    import os
    import subprocess
    import sys

    import yaml

    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "offside.cli", "quickstart", "--out", str(out), "--players", "2",
                           "--seeds", "2", "--phrasings", "2"], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["vanilla", "ga", "gd"] and all(r["seeds"] == 2 for r in rows)
    for row in rows:
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        assert [r["run_dir"] for r in row["runs"]] == [str(out / f"seed{s}" / row["name"]) for s in (0, 1)]
        key = "forget/image/all/mcq_acc"
        assert row["metrics"][key] == pytest.approx(sum(r["metrics"][key] for r in row["runs"]) / 2) and key in row["intervals"]
    for seed in (0, 1):
        vanilla = out / f"seed{seed}" / "vanilla"
        assert json.loads((vanilla / "manifest.json").read_text())["seed"] == seed
        assert yaml.safe_load((vanilla / "config.yaml").read_text())["phrasings"] == 2
        assert json.loads((vanilla / "metrics.json").read_text())["final/epoch"] == 20  # the tiny recipe's 40 / 2
    assert rows[1]["runs"][0]["metrics"] != rows[1]["runs"][1]["metrics"]  # another vanilla model, another GA
    assert "2 seeds" in (out / "leaderboard.md").read_text()
