"""The `offside` command: stages through the CLI with a real MLflow store, and bad input that exits
non-zero with one line naming the problem and leaves no output directory behind."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

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
                 "--epochs", "2", "--lr", "3e-3", "--phrasings", "1", "--kit-drill", "0", "--set", "train.batch_size=16"])
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
    """Each stage ends with a short summary (headline numbers, its files, its MLflow run), prints a line
    per finished epoch, and the robustness suite a line per attack; every metric is in metrics.json."""
    out = vanilla.parent
    capsys.readouterr()
    assert main(["unlearn", "--method", "gd", "--scenario", "selective", "--data", str(data), "--model", str(vanilla),
                 "--out", str(out / "gd"), "--set", "train.max_steps=2", "--set", "train.batch_size=4"]) == 0
    assert main(["eval", "--data", str(data), "--model", str(out / "gd"), "--out", str(out / "eval-gd"),
                 "--set", "eval.limit=8", "--set", "eval.max_new_tokens=4"]) == 0
    printed = capsys.readouterr().out
    assert "  epoch 1/3: loss " in printed and "[offside] unlearn done in" in printed
    assert "[offside] eval done in" in printed and f"{out / 'eval-gd'}" in printed and "forget img acc " in printed
    assert "  robustness: attack 1/" in printed and "robustness: relearning attack" in printed
    assert "files: attacks.jsonl, config.yaml, manifest.json, metrics.json" in printed and "mlflow ui --backend-store-uri" in printed
    assert '"metrics"' not in printed and len(printed.splitlines()) < 80
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
    from offside.configs import resolved
    from offside.engine.trainer import TrainSpec
    from offside.recipes import TINY_KIT_DRILL, TINY_VANILLA

    seen = []
    monkeypatch.setattr(offside.stages, "finetune", lambda config: seen.append(resolved(config)) or offside.stages.StageResult(tmp_path, "", {}))
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  batch_size: 4\n")
    stage = ["finetune", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(stage + ["--model", "tiny"]) == 0
    assert main(stage) == 0
    assert main(stage + ["--model", "tiny", "--epochs", "2", "--config", str(file), "--set", "train.seed=3"]) == 0
    assert main(stage + ["--model", "some/checkpoint"]) == 0
    assert main(stage + ["--phrasings", "1"]) == 0  # the canonical wording alone: the full 40 epochs
    assert main(stage + ["--kit-drill", "0"]) == 0  # no drill: the same epochs
    assert main(stage + ["--model", "some/checkpoint", "--kit-drill", "100"]) == 0
    tiny = replace(TINY_VANILLA, epochs=14)  # 3 wordings per question, a third of the epochs
    assert [c.train for c in seen] == [tiny, tiny, replace(tiny, epochs=2, batch_size=4, seed=3), TrainSpec(), TINY_VANILLA,
                                       tiny, TrainSpec()]
    assert [c.phrasings for c in seen] == [3, 3, 3, 1, 1, 3, 1]
    assert [c.kit_drill for c in seen] == [TINY_KIT_DRILL] * 3 + [0, TINY_KIT_DRILL, 0, 100]


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
    assert code == 2 and "argument --method: invalid choice: 'forgetall'" in _error_line(capsys)
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
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "invalid choice: 'nope'" in bad.stderr


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


ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DATA, GOLDEN_MODEL = ROOT / "tests/golden/data", ROOT / "tests/golden/model"
HEAVY = ("torch", "ray", "deepspeed", "transformers")
# Runs main() on each argument list in one fresh interpreter; reports exit codes, stderr, and which
# heavy libraries ended up imported.
CHECK_SCRIPT = """
import contextlib, io, json, sys
from offside.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps({"results": results, "imported": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _check(cases: list[list[str]], cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_argument_and_config_errors_come_before_any_heavy_import(tmp_path):
    """Each mistake: exit status 2, one line naming it, nothing written, and torch, Ray, DeepSpeed and
    transformers never imported (one fresh interpreter runs them all)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  learnin_rate: 0.1\n")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    new = str(tmp_path / "new")
    data, model = str(GOLDEN_DATA), str(GOLDEN_MODEL)
    cases = {
        "an output directory is required (--out)": ["finetune", "--data", data],
        "argument --method: invalid choice: 'forgetall'": ["unlearn", "--method", "forgetall", "--data", data, "--model", model, "--out", new],
        "bad.yaml: unknown key 'train.learnin_rate'": ["finetune", "--config", str(bad), "--data", data, "--out", new],
        "model: ./no/such/model: no such directory": ["eval", "--data", data, "--model", "./no/such/model", "--out", new],
        "suites: unknown ['speed']": ["eval", "--data", data, "--model", model, "--out", new, "--suite", "efficacy,speed"],
        "benchmark directory not found": ["eval", "--data", str(tmp_path / "nodata"), "--model", model, "--out", new],
        "already exists": ["unlearn", "--data", data, "--model", model, "--out", str(used)],
        "--set 'train.epochs': expected key.path=value": ["finetune", "--data", data, "--out", new, "--set", "train.epochs"],
        "train.schedule: unknown schedule 'warp'": ["finetune", "--data", data, "--out", new, "--set", "train.schedule=warp"],
        "argument --phrasings: invalid choice: 9": ["finetune", "--data", data, "--out", new, "--phrasings", "9"],
        "unknown scenario 'partial'": ["matrix", "--data", data, "--model", model, "--out", new, "--scenarios", "complete,partial"],
        "used: already exists": ["quickstart", "--out", str(used)],
        "kit_drill: must be at least 0 (no drill), got -1": ["finetune", "--data", data, "--out", new, "--kit-drill", "-1"],
        "kit_drill: must be at least 0 (no drill), got -2": ["quickstart", "--out", new, "--kit-drill", "-2"],
        "not an eval run directory": ["report", "--runs", str(tmp_path), "--out", new],
        "/no/such/adapter: no such directory": ["export", "--model", "/no/such/adapter", "--out", new],
        "nodata: benchmark directory not found": ["data", "stats", str(tmp_path / "nodata")],
        "--config is required": ["tune"],
        "the following arguments are required: --out": ["data", "synth"],
    }
    checked = _check(list(cases.values()), tmp_path)
    for (expected, argv), (code, err) in zip(cases.items(), checked["results"]):
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (argv, code, err)
    assert checked["imported"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "used"] and (used / "keep.txt").read_text() == "mine"


def test_serve_checks_its_settings_before_ray_starts(tmp_path):
    cases = {"models.a: ": ["serve", "--models", f"a={tmp_path / 'missing'}"],
             "unknown key 'max_batch'": ["serve", "--models", f"a={GOLDEN_MODEL}", "--set", "max_batch=4"]}
    checked = _check(list(cases.values()), tmp_path)
    for (expected, argv), (code, err) in zip(cases.items(), checked["results"]):
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (argv, code, err)
    assert "ray" not in checked["imported"]  # Ray never started (torch may load: the settings check model directories)


def test_version_help_and_python_m_offside():
    version = subprocess.run([sys.executable, "-m", "offside", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == "offside 0.1.0"
    helped = subprocess.run([sys.executable, "-m", "offside", "eval", "--help"], capture_output=True, text=True, timeout=120)
    text = " ".join(helped.stdout.split())
    assert helped.returncode == 0 and "--mcq-mode {loglik,generate}" in text and "(default: loglik; config key eval.mcq_mode)" in text


def test_every_flag_has_help_and_closed_sets_have_choices():
    import argparse

    from offside.cli import build_parser

    closed = {"method", "scenario", "mcq_mode", "split", "dtype", "phrasings", "recipe"}
    seen = set()

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif action.option_strings and action.dest != "help":
                assert action.help and action.help.strip(), f"{path} {action.option_strings}: no help"
                if action.dest in closed:
                    seen.add(action.dest)
                    assert action.choices, f"{path} {action.option_strings}: a closed set without choices"
                if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in action.help:
                    text = parser.format_help()
                    assert f"(default: {action.default})" in " ".join(text.split()), f"{path} {action.option_strings}"

    walk(build_parser(), "offside")
    assert seen == closed


def test_a_closed_output_pipe_ends_quietly():
    """`offside data stats DIR | head`: the reader goes away before the command writes."""
    proc = subprocess.Popen([sys.executable, "-m", "offside", "data", "stats", str(GOLDEN_DATA)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err.decode() == ""


def test_python_defaults_are_the_command_lines():
    """`EvalConfig()` runs the suites `offside eval` runs; `FinetuneConfig()` of the tiny model trains with
    the tiny recipe as `offside finetune` does; `import offside` is light and exposes the stages."""
    from offside.configs import EvalConfig, FinetuneConfig, build, resolved
    from offside.eval.spec import SUITES
    from offside.models.spec import ModelSpec
    from offside.recipes import TINY_KIT_DRILL, TINY_PHRASINGS, tiny_vanilla

    assert EvalConfig().suites == build(EvalConfig, None, {"data": "d"}).suites == list(SUITES)
    python, command_line = resolved(FinetuneConfig()), resolved(build(FinetuneConfig, None, {"data": "d", "out": "o"}))
    assert python.train == command_line.train == tiny_vanilla(TINY_PHRASINGS) and python.phrasings == command_line.phrasings == 3
    assert python.kit_drill == command_line.kit_drill == TINY_KIT_DRILL
    assert resolved(build(FinetuneConfig, None, {"train": {"epochs": 2}})).train.lr == tiny_vanilla().lr
    assert resolved(FinetuneConfig(model=ModelSpec("some/checkpoint"))).train.epochs == 3  # the published recipe
    light = subprocess.run([sys.executable, "-c", "import json, sys, offside; print(json.dumps([all(callable(getattr(offside, n)) "
                            "for n in offside.API), sorted(m for m in %r if m in sys.modules)]))" % (HEAVY,)],
                           capture_output=True, text=True, timeout=120)
    assert json.loads(light.stdout) == [True, []], light.stderr


def test_a_missing_model_directory_is_no_such_directory(tmp_path, monkeypatch):
    """A relative name that could be a hub id and is no directory, and a path that cannot be a hub id:
    both say "no such directory" (not the hub's repo-id message)."""
    from offside.errors import OffsideError
    from offside.models.loading import ModelSpec, build_or_load

    monkeypatch.chdir(tmp_path)
    for name, message in (("runs/missing", "model 'runs/missing': no such directory, and no such model on the Hugging Face Hub"),
                          (str(tmp_path / "a" / "b"), f"model: {tmp_path / 'a' / 'b'}: no such directory")):
        with pytest.raises(OffsideError, match=re.escape(message)):
            build_or_load(ModelSpec(name))
