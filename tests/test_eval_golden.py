"""Golden reference (tests/golden/golden_run.py): a committed model's evaluation and short training
runs reproduce their committed numbers under every CPU kernel family, and a small real change to a
loss term or a metric breaks them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))

import golden_run  # noqa: E402
from golden_run import CAPABILITIES, EVAL_GOLDEN, EVAL_TOLERANCE, TRAINING_GOLDEN, drift  # noqa: E402


def _native_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


# The default tier checks this machine's own kernels; the others (stand-ins for other CPUs) are slow
# tier, which CI runs, so every capability is checked before anything lands.
@pytest.mark.parametrize("capability", [c if c == _native_capability() else pytest.param(c, marks=pytest.mark.slow)
                                        for c in CAPABILITIES])
def test_goldens_hold_under_every_cpu_capability(capability, tmp_path):
    """`golden_run.py check` in a process whose torch dispatches to `capability`'s kernels (the
    stand-in for another CPU): both goldens hold."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "TMPDIR": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(Path(golden_run.__file__)), "check"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"drift under {capability}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"eval": {}, "training": {}}


def test_a_one_percent_change_to_a_loss_term_breaks_the_training_golden(tmp_path):
    golden = json.loads(TRAINING_GOLDEN.read_text())
    gd = {k: v for k, v in golden["metrics"].items() if k.startswith("gd/")}
    assert gd, "the training golden covers gradient difference"
    got = golden_run.training_metrics(tmp_path, methods=["gd"], finetune_epochs=0,
                                      method_args={"gd": {"forget_weight": 0.25 * 1.01}})
    moved = drift(gd, got, golden["tolerance"], relative=True)
    assert "gd/epoch1/loss" in moved, moved
    # the same run unperturbed is within tolerance: the failure above is the perturbation's
    same = golden_run.training_metrics(tmp_path / "again", methods=["gd"], finetune_epochs=0)
    assert not drift(gd, same, golden["tolerance"], relative=True)


def test_a_small_change_to_a_metric_breaks_the_eval_golden(tmp_path, monkeypatch):
    from offside.eval.metrics import METRICS

    expected = json.loads(EVAL_GOLDEN.read_text())
    rouge1 = METRICS["gen"]["rouge1"]
    monkeypatch.setitem(METRICS["gen"], "rouge1", lambda prediction, reference: 0.999 * rouge1(prediction, reference))
    got = golden_run.eval_metrics(tmp_path, suites=["efficacy"])
    moved = drift({k: expected[k] for k in got}, got, EVAL_TOLERANCE)
    assert moved and all(k.endswith("/rouge1") for k in moved), moved
    assert "forget/image/all/rouge1" in moved


def test_training_tolerances_are_derived_from_the_measured_spread():
    golden = json.loads(TRAINING_GOLDEN.read_text())
    measured = golden["measured"]
    assert sorted(measured["capabilities"]) == sorted(CAPABILITIES) and len(measured["seeds"]) >= 2
    for run, tolerance in golden["tolerance"].items():
        largest = max(measured["capability_spread"][run].values())
        assert tolerance == pytest.approx(max(measured["floor"], measured["safety"] * largest), rel=0.1), run
        # each run's golden resolves changes far smaller than what another seed does
        assert tolerance < measured["seed_spread"][run] / 100, run


def test_golden_files_cover_every_suite_and_method():
    from offside.unlearn import available

    expected = json.loads(EVAL_GOLDEN.read_text())
    for prefix in ("forget/", "relearn/", "test/", "retain/", "general/", "robust/attack/", "robust/int8/",
                   "robust/logit_lens/", "privacy/mia_auc"):
        assert any(k.startswith(prefix) for k in expected), prefix
    # the committed model has learned its forget set: the unattacked recovery is high
    assert expected["robust/attack/none/mcq/recovery"] > 0.5
    runs = {k.split("/")[0] for k in json.loads(TRAINING_GOLDEN.read_text())["metrics"]}
    assert runs == {"finetune", *available()}
