"""The `offside` command: stages through the CLI with a real MLflow store, and bad input that exits
non-zero with one line naming the problem and leaves no output directory behind."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient

from offside.cli import main
from offside.data.synth import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("d") / "bench", players=2, seed=1)


@pytest.fixture(scope="module")
def vanilla(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    code = main(["finetune", "--data", str(data), "--model", "tiny", "--out", str(work / "vanilla"),
                 "--epochs", "2", "--lr", "3e-3", "--set", "train.batch_size=16"])
    assert code == 0
    return work / "vanilla"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_finetune_writes_stage_directory_and_mlflow_run(vanilla):
    files = {p.name for p in vanilla.iterdir()}
    assert {"model.safetensors", "config.json", "config.yaml", "metrics.json", "manifest.json", "offside_model.json"} <= files
    assert not (vanilla / "checkpoints").exists()
    manifest = json.loads((vanilla / "manifest.json").read_text())
    assert manifest["seed"] == 0 and len(manifest["data_hash"]) == 64 and manifest["wall_time_s"] > 0
    client = MlflowClient(f"sqlite:///{vanilla.parent / 'mlflow.db'}")
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "finetune"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.name"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2] and history[1].value < history[0].value
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "manifest.json"} <= artifacts


def test_unlearn_then_eval_through_cli(data, vanilla, capsys):
    out = vanilla.parent
    assert main(["unlearn", "--method", "gd", "--scenario", "selective", "--data", str(data), "--model", str(vanilla),
                 "--out", str(out / "gd"), "--set", "train.max_steps=2", "--set", "train.batch_size=4"]) == 0
    assert main(["eval", "--data", str(data), "--model", str(out / "gd"), "--out", str(out / "eval-gd"),
                 "--set", "eval.limit=8", "--set", "eval.max_new_tokens=4"]) == 0
    metrics = json.loads((out / "eval-gd" / "metrics.json").read_text())
    run_id = json.loads((out / "eval-gd" / "manifest.json").read_text())["mlflow_run_id"]
    logged = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["forget/image/all/mcq_acc"] == pytest.approx(logged["forget/image/all/mcq_acc"])
    assert len(metrics) == len(logged)


def test_finetune_of_tiny_starts_from_the_tiny_recipe(tmp_path, data, monkeypatch):
    """`--model tiny` (the default model) trains with the tiny recipe where the user set nothing; flags,
    --config and --set win over it; a real checkpoint keeps the published defaults. Configs only: the
    stage itself is replaced."""
    import offside.stages
    from offside.engine.trainer import TrainSpec
    from offside.recipes import TINY_VANILLA

    seen = []
    monkeypatch.setattr(offside.stages, "finetune", lambda config: seen.append(config) or offside.stages.StageResult(tmp_path, "", {}))
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  batch_size: 4\n")
    stage = ["finetune", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(stage + ["--model", "tiny"]) == 0
    assert main(stage) == 0
    assert main(stage + ["--model", "tiny", "--epochs", "2", "--config", str(file), "--set", "train.seed=3"]) == 0
    assert main(stage + ["--model", "some/checkpoint"]) == 0
    assert main(stage + ["--phrasings", "1"]) == 0  # the canonical wording alone: the full 40 epochs
    tiny = replace(TINY_VANILLA, epochs=14)  # 3 wordings per question, a third of the epochs
    assert [c.train for c in seen] == [tiny, tiny, replace(tiny, epochs=2, batch_size=4, seed=3), TrainSpec(), TINY_VANILLA]
    assert [c.phrasings for c in seen] == [3, 3, 3, 1, 1]


def test_unknown_config_key(tmp_path, data, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 1\n  learnin_rate: 0.1\n")
    code = main(["finetune", "--config", str(config), "--data", str(data), "--model", "tiny", "--out", str(tmp_path / "o")])
    assert code == 2
    line = _error_line(capsys)
    assert "train.learnin_rate" in line and "bad.yaml" in line
    assert not (tmp_path / "o").exists()


def test_unknown_method(tmp_path, data, vanilla, capsys):
    code = main(["unlearn", "--method", "forgetall", "--data", str(data), "--model", str(vanilla), "--out", str(tmp_path / "o")])
    assert code == 2 and "unknown method 'forgetall'" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def _broken_copy(data, tmp_path, breaker):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(data, copy)
    breaker(copy)
    return copy


def test_malformed_record_fails_and_leaves_no_output(tmp_path, data, vanilla, capsys):
    def drop_messages(d):
        records = json.loads((d / "retain_set.json").read_text())
        records[3] = {"images": records[3]["images"]}
        (d / "retain_set.json").write_text(json.dumps(records))

    broken = _broken_copy(data, tmp_path, drop_messages)
    code = main(["eval", "--data", str(broken), "--model", str(vanilla), "--out", str(tmp_path / "o")])
    line = _error_line(capsys)
    assert code == 2 and "retain_set.json" in line and "3" in line
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))


def test_missing_image_fails_with_its_name(tmp_path, data, vanilla, capsys):
    broken = _broken_copy(data, tmp_path, lambda d: (d / "images" / "0004.png").unlink())
    code = main(["eval", "--data", str(broken), "--model", str(vanilla), "--out", str(tmp_path / "o")])
    assert code == 2 and "0004.png" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_existing_output_is_never_overwritten(tmp_path, data, vanilla, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code = main(["eval", "--data", str(data), "--model", str(vanilla), "--out", str(tmp_path / "o")])
    assert code == 2 and "already exists" in _error_line(capsys)
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_console_script_exit_code_and_stats(data):
    stats = subprocess.run([sys.executable, "-m", "offside.cli", "data", "stats", str(data), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert stats.returncode == 0
    counts = json.loads(stats.stdout)
    assert counts["forget"]["image"]["gen"]["all"] == 2 * 14 and counts["test"]["text"]["mcq"]["all"] == 2 * 42
    bad = subprocess.run([sys.executable, "-m", "offside.cli", "unlearn", "--method", "nope", "--data", str(data),
                          "--model", "x", "--out", "y"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown method" in bad.stderr


def test_published_format_directory_loads_and_evaluates(tmp_path, vanilla):
    from test_data import _published

    published = _published(tmp_path / "pub")
    assert main(["eval", "--data", str(published), "--model", str(vanilla), "--out", str(tmp_path / "e"),
                 "--set", "eval.max_new_tokens=4"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "forget/image/all/mcq_acc" in metrics and "relearn/image/all/rougeL" in metrics
    assert "forget/image/unknown/rougeL" in metrics  # rows whose field could not be inferred still count
    assert not any(k.startswith("test/") for k in metrics)  # the fixture has no test split


def test_lora_unlearning_saves_its_adapter_and_export_merges_it(data, vanilla, tmp_path):
    out, merged_dir = tmp_path / "lora", tmp_path / "merged"
    assert main(["unlearn", "--method", "ga", "--data", str(data), "--model", str(vanilla), "--out", str(out),
                 "--set", "model.lora={r: 4, alpha: 8, targets: [q_proj, v_proj], groups: [language]}",
                 "--set", "train.max_steps=2", "--set", "train.lr=0.01"]) == 0
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert main(["export", "--model", str(out), "--out", str(merged_dir)]) == 0
    from safetensors.torch import load_file

    merged, base = load_file(merged_dir / "model.safetensors"), load_file(vanilla / "model.safetensors")
    assert set(merged) == set(base)  # plain weights: no lora_A/lora_B left
    changed = {k for k in base if not (merged[k] == base[k]).all()}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
