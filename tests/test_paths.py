"""Every path a run records (results, metrics, config, manifest files) is absolute or relative to the
file that holds it, so the files can be read from any directory."""

import json
from pathlib import Path

import pytest
import yaml


RECORDS = ("results.json", "config.yaml", "manifest.json", "metrics.json", "best.yaml", "sweep.yaml", "trial.json", "export.json")


def relative_to_cwd(value, cwd: Path) -> list[str]:
    """The strings in a parsed JSON/YAML value that are relative paths naming something under `cwd`."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in relative_to_cwd(v, cwd)]
    if isinstance(value, list):
        return [p for v in value for p in relative_to_cwd(v, cwd)]
    if isinstance(value, str) and value and not Path(value).is_absolute() and "\n" not in value and len(value) < 4096:
        return [value] if (cwd / value).exists() and value not in (".", "tiny") else []
    return []


@pytest.mark.slow
def test_quickstart_with_a_relative_out_is_read_from_another_directory(quickstart_run, tmp_path, monkeypatch):
    """The README's command, `--out runs/quickstart` relative to where it ran (the `quickstart_run`
    fixture), read from another directory."""
    out, _ = quickstart_run
    ran_in = out.parent.parent
    monkeypatch.chdir(tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in results} == {"vanilla", "ga", "gd"}
    for row in results:
        for key in ("run_dir", "eval_dir"):
            assert Path(row[key]).is_absolute() and Path(row[key]).is_dir(), (row["name"], key, row[key])
    recorded = [f for name in RECORDS for f in out.rglob(name) if "trials" not in f.relative_to(out).parts]
    assert {f.parent.name for f in recorded} >= {"quickstart", "vanilla", "ga", "gd", "eval-ga", "unlearn-sweep"}
    for file in recorded:
        parsed = yaml.safe_load(file.read_text())  # JSON is YAML
        assert relative_to_cwd(parsed, ran_in) == [], file
