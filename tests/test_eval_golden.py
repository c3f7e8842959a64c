"""Golden reference: the pinned small run (tests/golden/golden_run.py) reproduces the committed
metrics within TOLERANCE on every key, and no key appears or disappears unnoticed."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))

from golden_run import GOLDEN, TOLERANCE, golden_metrics  # noqa: E402


pytestmark = pytest.mark.skipif(not GOLDEN.is_file(), reason=f"{GOLDEN} not generated yet: run python tests/golden/golden_run.py")


def test_golden_metrics_reproduce(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    expected = json.loads(GOLDEN.read_text())
    got = golden_metrics(tmp_path)
    assert sorted(got) == sorted(expected), "metric keys changed"
    drift = {k: (expected[k], got[k]) for k in expected if abs(got[k] - expected[k]) > TOLERANCE}
    assert not drift, f"metrics moved beyond {TOLERANCE}: {drift}"


def test_golden_file_covers_every_suite():
    expected = json.loads(GOLDEN.read_text())
    for prefix in ("forget/", "relearn/", "test/", "retain/", "general/", "robust/attack/", "robust/int8/",
                   "robust/logit_lens/", "privacy/mia_auc"):
        assert any(k.startswith(prefix) for k in expected), prefix
    # the pinned vanilla model has learned its forget set: the unattacked recovery is high
    assert expected["robust/attack/none/mcq/recovery"] > 0.5
