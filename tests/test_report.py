"""`offside report`: leaderboard, self-contained HTML whose embedded plots decode as images and
render in a headless browser (Debian's Chromium driven by Playwright; `.ci/run` installs both), PNGs,
and the MLflow run."""

import base64
import io
import json
import math
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


def _model(root, name, stage, method=None, scenario=None, seed=3, base=None, **config):
    """A fake stage's model directory; config.yaml as the stage writes it (out, model.name, train.seed)."""
    d = root / name
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "seed": seed, "wall_time_s": 10.0}))
    config = ({"method": method, "scenario": scenario} if method else {"split": "retain+forget"}) | config
    config |= {"out": str(d), "model": {"name": str(base or "tiny")}, "train": {"seed": seed, **config.get("train", {})}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


def _eval(root, name, model_dir, metrics, run_id, predictions=None, **config):
    d = root / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(model_dir)}, "out": str(d)} | config))
    (d / "manifest.json").write_text(json.dumps({"stage": "eval", "data_hash": "abcdef0123456789", "wall_time_s": 2.5,
                                                 "versions": {"offside": "0.1.0", "torch": "2.13.0+cpu"}, "mlflow_run_id": run_id}))
    if predictions is not None:
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in predictions))
    return d


def _metrics(forget, retain, recoveries, relearn, visual=None, textual=None):
    m = {"forget/image/all/mcq_acc": forget, "forget/text/all/mcq_acc": forget, "retain/image/all/mcq_acc": retain,
         "test/image/all/mcq_acc": retain, "general/image/all/mcq_acc": 0.3, "privacy/mia_auc": 0.6}
    m |= {f"robust/attack/{a}/recovery": v for a, v in recoveries.items()}
    m |= {f"robust/relearn/k{k}/recovery": v for k, v in relearn.items()}
    m |= {f"forget/image/{kind}/mcq_acc": v for kind, v in (("visual", visual), ("textual", textual)) if v is not None}
    return m


def _board_row(board, name):
    (line,) = [line for line in board.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def _column(board, title):
    head = next(line for line in board.splitlines() if line.startswith("| run |"))
    return [cell.strip() for cell in head.strip("|").split("|")].index(title)


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


T95_2DOF = 4.303  # Student's t, two-sided 95 %, 2 degrees of freedom


def _ga_seeds(root, vanilla_model, forgets=(0.3, 0.4, 0.5), visuals=(0.6, 0.7, 0.8), **train):
    """Three seed replicates of GA from one vanilla model, evaluated as the matrix names them."""
    dirs = []
    for seed, forget, visual in zip(range(3), forgets, visuals):
        model = _model(root, f"ga-seed{seed}", "unlearn", "ga", "complete", seed=seed, base=vanilla_model,
                       method_args={"alpha": 1.0}, train={"lr": 1e-5, **train})
        recoveries = {"none": 0.3, "few_shot": (0.6, 0.2, 0.5)[seed]}  # worst per seed differs; by mean: few_shot
        dirs.append(_eval(root, f"eval-ga-complete-seed{seed}", model,
                          _metrics(forget, 0.7, recoveries, {}, visual=visual, textual=0.2), f"r{seed}"))
    return dirs


def _vanilla(root, name="vanilla", seed=3, forget=1.0):
    model = _model(root, name, "finetune", seed=seed)
    return model, _eval(root, f"eval-{name}", model,
                        _metrics(forget, 0.9, {"none": 0.95, "few_shot": 0.9}, {}, visual=0.9, textual=0.8), "rv")


def test_seed_replicates_make_one_row_with_a_students_t_interval(tmp_path):
    model, vanilla = _vanilla(tmp_path)
    out = make_report(ReportConfig(runs=[str(vanilla), *map(str, _ga_seeds(tmp_path, model))], out=str(tmp_path / "report")))
    board = (out / "leaderboard.md").read_text()
    assert sum(line.startswith("| eval-ga") for line in board.splitlines()) == 1
    row = _board_row(board, "eval-ga-complete")
    # forget efficacy per seed 1 − forget acc / 1.0 = 0.7, 0.6, 0.5: mean 0.6, sample sd 0.1
    half = T95_2DOF * 0.1 / math.sqrt(3)
    assert row[:4] == ["eval-ga-complete", "ga", "complete", f"0.600 ± {half:.3f}"]
    assert row[_column(board, "forget img acc")] == f"0.400 ± {half:.3f}"
    assert row[_column(board, "visual survival")] == f"{0.7 / 0.9:.3f} ± {half / 0.9:.3f}"
    assert row[_column(board, "textual survival")] == f"{0.2 / 0.8:.3f} ± 0.000"
    assert row[_column(board, "interval over")] == "3 seeds" and row[_column(board, "seed")] == "0,1,2"
    assert row[_column(board, "worst attack")] == "few_shot"
    assert row[_column(board, "MLflow run")] == "runs:/r0 runs:/r1 runs:/r2"

    summary = json.loads((out / "summary.json").read_text())["eval-ga-complete"]
    assert summary["summary/forget_efficacy"] == pytest.approx(0.6)
    assert summary["half_width"]["summary/forget_efficacy"] == pytest.approx(half)
    assert summary["half_width"]["summary/survival/visual"] == pytest.approx(half / 0.9)
    assert (summary["n"], summary["seeds"], summary["interval_over"]) == (3, [0, 1, 2], "3 seeds")
    assert summary["runs"] == [f"eval-ga-complete-seed{s}" for s in range(3)]
    assert summary["worst_attack"] == "few_shot" and summary["vanilla"] == ["eval-vanilla"]


def test_a_single_run_gets_a_bootstrap_interval_over_items_on_its_accuracies(tmp_path):
    from offside.report.intervals import over_items
    from offside.report.report import collect, leaderboard_md

    model, vanilla = _vanilla(tmp_path)
    records = [{"id": f"{split}{i}", "split": split, "modality": "image", "form": "mcq", "output": 0,
                "mcq_acc": float(i % 5 < correct)} for split, correct in (("forget", 2), ("retain", 4)) for i in range(100)]
    ga = _eval(tmp_path, "eval-ga", _model(tmp_path, "ga", "unlearn", "ga", "complete", base=model),
               _metrics(0.4, 0.8, {"none": 0.3}, {}), "r1", predictions=records)
    board = leaderboard_md(collect(ReportConfig(runs=[str(vanilla), str(ga)])))
    row = _board_row(board, "eval-ga")
    widths = over_items(records)
    # a proportion of 0.4 over 100 items: 1.96 × √(0.24 / 100) ≈ 0.096
    assert widths["forget/image/all/mcq_acc"] == pytest.approx(0.096, abs=0.015)
    assert row[_column(board, "forget img acc")] == f"0.400 ± {widths['forget/image/all/mcq_acc']:.3f}"
    assert row[_column(board, "retain img acc")] == f"0.800 ± {widths['retain/image/all/mcq_acc']:.3f}"
    assert row[_column(board, "forget txt acc")] == "0.400"  # no text-form predictions: no interval
    assert row[_column(board, "forget efficacy")] == "0.600"  # a ratio of two runs: plain
    assert row[_column(board, "interval over")] == "items (bootstrap)"
    assert _board_row(board, "eval-vanilla")[_column(board, "interval over")] == "–"  # no predictions.jsonl


def test_runs_that_differ_in_more_than_the_seed_are_separate_rows(tmp_path):
    from offside.report.report import collect

    model, vanilla = _vanilla(tmp_path)
    ga = [_model(tmp_path, f"ga-seed{s}", "unlearn", "ga", "complete", seed=s, base=model, method_args={"alpha": a},
                 train={"lr": lr}) for s, a, lr in ((0, 1.0, 1e-5), (1, 2.0, 1e-5), (2, 1.0, 5e-5), (3, 1.0, 1e-5))]
    evals = [_eval(tmp_path, f"eval-ga-seed{s}", m, _metrics(0.4, 0.7, {}, {}), f"r{s}") for s, m in enumerate(ga)]
    # the same model as seed 0 scored with other eval settings: not a replicate either
    evals.append(_eval(tmp_path, "eval-ga-seed0-limited", ga[0], _metrics(0.5, 0.7, {}, {}), "r9", eval={"limit": 8}))
    rows = collect(ReportConfig(runs=[str(vanilla), *map(str, evals)]))
    assert [(r.name, len(r.runs)) for r in rows] == [
        ("eval-vanilla", 1), ("eval-ga", 2), ("eval-ga-seed1", 1), ("eval-ga-seed2", 1), ("eval-ga-seed0-limited", 1)]
    assert [r.name for r in rows[1].runs] == ["eval-ga-seed0", "eval-ga-seed3"]  # differ only in seed and paths


def test_each_run_is_scored_against_the_vanilla_model_it_came_from(tmp_path):
    from offside.report.report import collect, leaderboard_md, summary_json

    vanillas = [_vanilla(tmp_path, f"vanilla-seed{s}", seed=s, forget=f) for s, f in ((0, 1.0), (1, 0.8))]
    ga = _eval(tmp_path, "eval-ga", _model(tmp_path, "ga", "unlearn", "ga", "complete", base=vanillas[1][0]),
               _metrics(0.4, 0.7, {}, {}, visual=0.45, textual=0.2), "r1")
    rows = collect(ReportConfig(runs=[str(vanillas[0][1]), str(vanillas[1][1]), str(ga)]))
    board = leaderboard_md(rows)
    row = _board_row(board, "eval-ga")
    assert row[_column(board, "forget efficacy")] == "0.500"  # 1 − 0.4 / 0.8 (vanilla seed 0 would give 0.600)
    assert row[_column(board, "visual survival")] == "0.500"  # 0.45 / 0.9
    assert summary_json(rows)["eval-ga"]["vanilla"] == ["eval-vanilla-seed1"]
    # the vanilla replicates are one row, each its own reference
    vanilla = _board_row(board, "eval-vanilla")
    assert vanilla[_column(board, "forget efficacy")] == "0.000 ± 0.000"
    assert vanilla[_column(board, "forget img acc")] == f"0.900 ± {12.706 * math.sqrt(0.02) / math.sqrt(2):.3f}"
    assert vanilla[_column(board, "interval over")] == "2 seeds"

    # --vanilla when the base model is not among the runs; the runs' own vanilla otherwise
    other = _eval(tmp_path, "eval-ga-other", _model(tmp_path, "ga-other", "unlearn", "ga", "complete", base=tmp_path / "x"),
                  _metrics(0.4, 0.7, {}, {}), "r2")
    rows = collect(ReportConfig(runs=[str(ga), str(other)], vanilla=str(vanillas[0][1])))
    assert [r.runs[0].vanilla for r in rows] == ["eval-vanilla-seed0", "eval-vanilla-seed0"]
    rows = collect(ReportConfig(runs=[str(vanillas[1][1]), str(ga)], vanilla=str(vanillas[0][1])))
    assert rows[1].summary["summary/forget_efficacy"] == pytest.approx(0.5)


def test_rumour_survival_plot_is_drawn_and_embedded(tmp_path):
    model, vanilla = _vanilla(tmp_path)
    gd = _eval(tmp_path, "eval-gd", _model(tmp_path, "gd", "unlearn", "gd", "complete", base=model),
               _metrics(0.4, 0.8, {"none": 0.3}, {}, visual=0.7, textual=0.1), "r9")
    runs = [vanilla, *_ga_seeds(tmp_path, model), gd]
    out = make_report(ReportConfig(runs=[str(d) for d in runs], out=str(tmp_path / "report")))
    assert "rumour_survival.png" in PLOTS
    image = Image.open(out / "rumour_survival.png")
    assert image.format == "PNG"
    image.load()
    assert image.width >= 400 and sum(1 for n in image.convert("L").histogram() if n) > 10
    parser = Images()
    parser.feed((out / "report.html").read_text())
    embedded = [src for src in parser.sources if src == "data:image/png;base64," + base64.b64encode(
        (out / "rumour_survival.png").read_bytes()).decode()]
    assert len(embedded) == 1 and 'alt="rumour_survival"' in (out / "report.html").read_text()


def test_attack_heatmap_says_not_run_without_the_robustness_suite(tmp_path):
    """No robustness results: the heat-map says so instead of drawing an empty grid that reads as recovery 0."""
    from offside.report.report import collect, plot_attacks

    model, _ = _vanilla(tmp_path)
    vanilla = _eval(tmp_path, "eval-plain", model, _metrics(1.0, 0.9, {}, {}), "rp")
    rows = collect(ReportConfig(runs=[str(vanilla)], out=str(tmp_path / "r")))
    (axes, *_) = plot_attacks(rows).axes
    assert not axes.images and any(t.get_text().startswith("not run") for t in axes.texts)
    (drawn, *_) = plot_attacks(collect(ReportConfig(runs=[str(_vanilla(tmp_path, "v2")[1])], out=str(tmp_path / "s")))).axes
    assert drawn.images and not any("not run" in t.get_text() for t in drawn.texts)


def test_the_html_defines_its_columns_and_states_the_findings_the_runs_allow(tmp_path):
    """GA in two scenarios over two seeds allows findings 1, 2 and 5 (the unimodal − complete gap
    per seed: +0.3, +0.2); one scenario alone allows 2 and 5; one seed each, only a note. The page
    defines every score column."""
    from offside.report.report import COLUMN_DEFINITIONS

    model, vanilla = _vanilla(tmp_path)
    runs = []
    for scenario, forgets in (("complete", (0.4, 0.5)), ("unimodal", (0.7, 0.7))):
        for seed, forget in enumerate(forgets):
            ga = _model(tmp_path, f"ga-{scenario}-seed{seed}", "unlearn", "ga", scenario, seed=seed, base=model)
            runs.append(_eval(tmp_path, f"eval-ga-{scenario}-seed{seed}", ga, _metrics(
                forget, 0.7, {"none": 0.3, "few_shot": 0.4 + 0.1 * seed}, {}, visual=0.5, textual=0.3), f"r{scenario}{seed}"))
    page = (make_report(ReportConfig(runs=[str(vanilla), *map(str, runs)], out=str(tmp_path / "r"))) / "report.html").read_text()
    assert "<h2>Columns</h2>" in page and all(f"<dt>{name}</dt>" in page for name in COLUMN_DEFINITIONS)
    across = f"+0.250 ± {12.706 * 0.05:.3f}"  # mean of +0.3 and +0.2, Student's t over 2 seeds
    assert f"<td>1 unimodal fails on the image form</td><td>{across}</td><td>undecided</td><td>ga {across} (undecided)</td>" in page
    assert "2 visual rumours" in page and "5 prompt attacks recover rumours: few_shot" in page
    alone = (make_report(ReportConfig(runs=[str(vanilla), *map(str, runs[:2])], out=str(tmp_path / "s"))) / "report.html").read_text()
    assert "<h2>Findings</h2>" in alone and "1 unimodal fails" not in alone and "2 visual rumours" in alone
    one = (make_report(ReportConfig(runs=[str(vanilla), str(runs[0])], out=str(tmp_path / "t"))) / "report.html").read_text()
    assert "report runs of at least two seeds" in one and "2 visual rumours" not in one
