"""The vanilla check (offside/eval/sanity.py): an untrained model is flagged (a trained one passes:
the quickstart's vanilla model, tests/test_quickstart.py); finetune and unlearn record the check in
their manifest, a sweep in its directory; the matrix refuses an untrained vanilla model before any
cell unless --allow-untrained."""

import json

import pytest
from conftest import untrained_tiny_bench

import offside.matrix
from offside.cli import main
from offside.data.loader import load_benchmark
from offside.eval.sanity import vanilla_check
from offside.models.loading import save

# 2 players: 28 forget and 84 retain multiple-choice questions per form (image, text)
QUESTIONS = {"forget": 2 * 28, "retain": 2 * 84}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """(data dir, directory of an untrained tiny model, its check)."""
    root = tmp_path_factory.mktemp("untrained")
    model, processor, _, data = untrained_tiny_bench(root, seed=0)
    save(model, processor, root / "model")
    return data, root / "model", vanilla_check(model, processor, load_benchmark(data))


def test_an_untrained_model_is_flagged(untrained):
    _, _, check = untrained
    assert not check["learned"]
    assert {split: check[split]["questions"] for split in QUESTIONS} == QUESTIONS
    assert any(check[split]["mcq_acc"] < check[split]["threshold"] for split in QUESTIONS)
    # chance is what knowing nothing scores: for the tiny model's tokenizer, well above 1 in 4 (see sanity.py)
    assert all(0.25 < check[split]["chance"] < check[split]["threshold"] for split in QUESTIONS)


def test_unlearn_warns_about_an_untrained_vanilla_model_and_records_it(untrained, tmp_path, capsys):
    data, model, _ = untrained
    assert main(["unlearn", "--method", "ga", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "ga"),
                 "--set", "train.max_steps=1", "--set", "train.batch_size=4"]) == 0
    assert f"warning: the vanilla model {model} has not learned the benchmark" in capsys.readouterr().err
    check = json.loads((tmp_path / "ga" / "manifest.json").read_text())["vanilla_check"]
    assert not check["learned"] and check["forget"]["questions"] == QUESTIONS["forget"]


def test_sweep_checks_its_vanilla_model(untrained, tmp_path, capsys):
    from tune_jobs.spec import SweepConfig
    from tune_jobs.sweep import _vanilla_metrics

    data, model, _ = untrained
    _vanilla_metrics(SweepConfig(data=str(data), vanilla=str(model)), tmp_path)
    assert f"warning: the vanilla model {model} has not learned the benchmark" in capsys.readouterr().err
    assert not json.loads((tmp_path / "vanilla_check.json").read_text())["learned"]


@pytest.fixture
def cells(monkeypatch):
    """Records the matrix cells that would run, instead of running them."""
    ran = []

    def fake_cell(config, out, method, scenario, *rest):
        ran.append((method, scenario))
        return {"name": f"{method}-{scenario}", "method": method, "scenario": scenario, "metrics": {}}

    monkeypatch.setattr(offside.matrix, "_run_cell", fake_cell)
    return ran


def test_matrix_refuses_an_untrained_vanilla_model_before_any_cell(untrained, tmp_path, cells, capsys):
    data, model, _ = untrained
    matrix = ["matrix", "--data", str(data), "--model", str(model), "--methods", "ga", "--scenarios", "complete"]
    assert main(matrix + ["--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "has not learned the benchmark" in error and "forget 0." in error and "--allow-untrained" in error
    assert cells == [] and not (tmp_path / "refused").exists()

    assert main(matrix + ["--out", str(tmp_path / "allowed"), "--allow-untrained"]) == 0
    assert "warning: the vanilla model" in capsys.readouterr().err
    assert cells == [("ga", "complete")]
    assert not json.loads((tmp_path / "allowed" / "vanilla_check.json").read_text())["learned"]
