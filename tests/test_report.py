"""`offside report`: leaderboard, self-contained HTML whose embedded plots decode as images and
render in a headless browser (Debian's Chromium driven by Playwright; `.ci/run` installs both), PNGs,
and the MLflow run."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from offside.errors import OffsideError
from offside.report.report import PLOTS, ReportConfig, make_report


def _model(root, name, stage, method=None, scenario=None):
    d = root / name
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "seed": 3, "wall_time_s": 10.0}))
    (d / "config.yaml").write_text(yaml.safe_dump({"method": method, "scenario": scenario} if method else {"split": "retain+forget"}))
    return d


def _eval(root, name, model_dir, metrics, run_id):
    d = root / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(model_dir)}}))
    (d / "manifest.json").write_text(json.dumps({"stage": "eval", "data_hash": "abcdef0123456789", "wall_time_s": 2.5,
                                                 "versions": {"offside": "0.1.0", "torch": "2.13.0+cpu"}, "mlflow_run_id": run_id}))
    return d


def _metrics(forget, retain, recoveries, relearn):
    m = {"forget/image/all/mcq_acc": forget, "forget/text/all/mcq_acc": forget, "retain/image/all/mcq_acc": retain,
         "test/image/all/mcq_acc": retain, "general/image/all/mcq_acc": 0.3, "privacy/mia_auc": 0.6}
    m |= {f"robust/attack/{a}/recovery": v for a, v in recoveries.items()}
    m |= {f"robust/relearn/k{k}/recovery": v for k, v in relearn.items()}
    return m


@pytest.fixture
def runs(tmp_path):
    vanilla = _eval(tmp_path, "eval-vanilla", _model(tmp_path, "vanilla", "finetune"),
                    _metrics(1.0, 0.9, {"none": 0.95, "few_shot": 0.9}, {0: 0.95, 2: 0.97}), "r0")
    ga = _eval(tmp_path, "eval-ga", _model(tmp_path, "ga", "unlearn", "ga", "complete"),
               _metrics(0.4, 0.7, {"none": 0.3, "few_shot": 0.5}, {0: 0.3, 2: 0.8}), "r1")
    return tmp_path, [vanilla, ga]


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_files_html_images_and_mlflow(runs):
    root, dirs = runs
    out = make_report(ReportConfig(runs=[str(d) for d in dirs], out=str(root / "report")))
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS, "leaderboard.md", "report.html", "summary.json"])
    board = (out / "leaderboard.md").read_text()
    assert "| eval-ga | ga | complete | 0.600 |" in board  # forget efficacy 1 - 0.4/1.0
    assert "runs:/r1" in board and "abcdef012345" in board and "12.5" in board  # link, data hash, train+eval wall time
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval-ga"]["summary/robust_forget"] == pytest.approx(1 - 0.8 / 0.95)
    assert summary["eval-ga"]["worst_attack"] == "relearn k2"

    page = (out / "report.html").read_text()
    parser = Images()
    parser.feed(page)
    assert len(parser.sources) == len(PLOTS)
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")  # self-contained: nothing to fetch
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.width >= 400 and image.height >= 300
        assert sum(1 for n in image.convert("L").histogram() if n) > 10  # a drawn plot, not a blank canvas
    for name in PLOTS:
        Image.open(out / name).verify()

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("offside").experiment_id], "tags.stage = 'report'")[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "leaderboard.md", *PLOTS} <= logged


def test_report_needs_a_vanilla_run_and_a_fresh_out_dir(runs):
    root, dirs = runs
    with pytest.raises(OffsideError, match="no vanilla run"):
        make_report(ReportConfig(runs=[str(dirs[1])], out=str(root / "r1")))
    assert not (root / "r1").exists()
    (root / "used").mkdir()
    (root / "used" / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "offside.cli", "report", "--runs", *map(str, dirs), "--out", str(root / "used")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (root / "used" / "keep.txt").read_text() == "x"
    with pytest.raises(OffsideError, match="not an eval run directory"):
        make_report(ReportConfig(runs=[str(root)], out=str(root / "r2")))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags this closed network needs: without them Chromium keeps dialling out and its requests are refused.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_report_renders_in_a_headless_browser_with_every_plot_loaded(runs, tmp_path):
    if not CHROMIUM and not os.environ.get("OFFSIDE_REQUIRE_BROWSER"):
        pytest.skip("no chromium on PATH (CI installs it: apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    root, dirs = runs
    out = make_report(ReportConfig(runs=[str(d) for d in dirs], out=str(root / "report")))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        failed = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto((out / "report.html").as_uri(), wait_until="load")
        images = page.evaluate("""() => Array.from(document.images).map(i => ({
            alt: i.alt, loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth,
            shown: i.getBoundingClientRect().width}))""")
        rows = page.evaluate("() => document.querySelectorAll('table tr').length")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert failed == []
    assert sorted(i["alt"] for i in images) == sorted(name.removesuffix(".png") for name in PLOTS)
    for image in images:
        assert image["loaded"] and image["width"] >= 400 and image["shown"] > 100, image
    assert rows >= 3  # header + vanilla + ga
    shot = Image.open(tmp_path / "report.png")
    assert shot.height > 900 and sum(1 for n in shot.convert("L").histogram() if n) > 50  # the page painted plots, not blank


def test_heatmap_and_worst_attack_include_image_and_4bit_attacks(tmp_path):
    from offside.report.report import attack_columns, collect, leaderboard_md

    extra = {"robust/nf4/recovery": 0.7, "robust/fp4/recovery": 0.35, "robust/int8/recovery": 0.3}
    vanilla = _eval(tmp_path, "eval-vanilla", _model(tmp_path, "vanilla", "finetune"),
                    _metrics(1.0, 0.9, {"none": 0.95, "img_jpeg": 0.9, "pgd_eps16": 0.96}, {0: 0.95, 8: 0.9}), "r0")
    ga = _eval(tmp_path, "eval-ga", _model(tmp_path, "ga", "unlearn", "ga", "complete"),
               _metrics(0.4, 0.7, {"none": 0.3, "img_jpeg": 0.32, "pgd_eps16": 0.5}, {0: 0.3, 8: 0.6}) | extra, "r1")
    runs = collect(ReportConfig(runs=[str(vanilla), str(ga)]))
    assert attack_columns(runs) == ["none", "img_jpeg", "pgd_eps16", "int8", "nf4", "fp4", "relearn k0", "relearn k8"]
    assert runs[1].worst_attack == "nf4"
    assert runs[1].summary["summary/robust_forget"] == pytest.approx(1 - 0.7 / 0.95)
    assert "| nf4 |" in leaderboard_md(runs)
