import os

# No test may reach a model or dataset hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's main job, run once per test session: (output dir, its stdout). Later tests reuse
    its benchmark and vanilla model instead of training another."""
    out = tmp_path_factory.mktemp("qs") / "run"
    proc = subprocess.run([sys.executable, "-m", "offside.cli", "quickstart", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
