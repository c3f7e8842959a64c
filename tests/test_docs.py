"""The documentation: the MkDocs site builds in strict mode (a broken link or a page missing from the
navigation fails), every `offside` command shown anywhere parses with the real argument parser, the
reference pages list every command, flag and config key, the README starts with its two commands
(the second is what CI runs), and the Python API page's example runs as written."""

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from offside.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Every file whose code blocks show commands (docs/reference/docs-checks.md says which).
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "bench/README.md", ROOT / "cluster/README.md",
             ROOT / "serve/README.md", ROOT / "tune_jobs/README.md", *sorted(DOCS.rglob("*.md"))]
SETUP_AND_QUICKSTART = "bash scripts/setup.sh && .venv/bin/offside quickstart --out runs/quickstart"
SETUP_AND_TESTS = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "2>&1", "<"}


def code_blocks(path: Path, languages=("bash", "sh", "")) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang in languages]


def offside_commands(block: str) -> list[list[str]]:
    """The argument lists of every `offside …` command in a shell block (continuations joined,
    comments dropped, split at shell operators; `python -m offside[.cli]` and paths to the script
    count, and so does the command after `offside submit … --`)."""
    text = re.sub(r"\\\n", " ", block)
    commands = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose-like lines: not a command
            continue
        segment: list[str] = []
        for word in [*words, ";"]:
            if word in OPERATORS:
                commands += _after_offside(segment)
                segment = []
            else:
                segment.append(word)
    return commands


def _after_offside(words: list[str]) -> list[list[str]]:
    """The arguments when the segment's command (after NAME=VALUE assignments) is offside, or a
    python/torchrun running `-m offside[.cli]`."""
    words = words[next((i for i, w in enumerate(words) if "=" not in w), len(words)):]
    if words and (words[0] == "offside" or words[0].endswith("/offside")):
        return [words[1:]]
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] in ("offside", "offside.cli"):
            return [words[i + 2:]]
    return []


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCUMENTS:
        for block in code_blocks(path):
            for argv in offside_commands(block):
                found.append((str(path.relative_to(ROOT)), argv))
                if argv[:1] == ["submit"] and "--" in argv:
                    found.append((str(path.relative_to(ROOT)), argv[argv.index("--") + 1:]))
    return found


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "how-to" / "gpu-3b" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "environment" / "index.html").is_file()


def test_the_readme_starts_with_its_two_commands_and_ci_runs_the_second():
    blocks = [b.strip() for b in code_blocks(ROOT / "README.md", ("bash",))]
    assert blocks[:2] == [SETUP_AND_QUICKSTART, SETUP_AND_TESTS]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ".venv/bin/python -m pytest -q" in ci  # the README's command, after CI's own `bash scripts/setup.sh`
    assert 200 <= len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_documented_command_parses(capsys):
    commands = documented_commands()
    subcommands = {argv[0] for _, argv in commands if argv}
    assert len(commands) >= 50 and {"quickstart", "finetune", "unlearn", "eval", "matrix", "tune", "serve", "submit"} <= subcommands
    parser = build_parser()
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as done:  # --help and --version exit 0
            assert done.code == 0, f"{where}: `offside {shlex.join(argv)}` does not parse: {capsys.readouterr().err}"


def test_the_readme_links_point_at_files():
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if not t.startswith(("http", "#"))]
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]


def _commands(parser: argparse.ArgumentParser, path=("offside",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))
    yield " ".join(path), [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


def test_the_commands_page_lists_every_command_and_flag():
    page = (DOCS / "reference" / "commands.md").read_text()
    for command, flags in _commands(build_parser()):
        assert f"`{command}" in page or command == "offside", command
        missing = [f for f in flags if f"`{f}" not in page and f != "--verbose"]
        assert not missing, (command, missing)


def test_the_configuration_page_lists_every_key():
    from offside.configs import EvalConfig, FinetuneConfig, MatrixConfig, RelearnConfig, UnlearnConfig
    from offside.engine.spec import TrainSpec
    from offside.eval.spec import EvalSpec, LLMJudgeSpec, RobustnessSpec, UtilitySpec
    from offside.models.spec import LoraSpec, ModelSpec, TinySpec
    from serve.settings import Limits, ServeSettings
    from tune_jobs.spec import ResourceSpec, SweepConfig

    page = (DOCS / "reference" / "configuration.md").read_text()
    classes = (FinetuneConfig, UnlearnConfig, RelearnConfig, EvalConfig, MatrixConfig, ModelSpec, LoraSpec, TinySpec,
               TrainSpec, EvalSpec, UtilitySpec, RobustnessSpec, LLMJudgeSpec, SweepConfig, ResourceSpec, ServeSettings, Limits)
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not re.search(rf"(?<![\w.]){re.escape(f.name)}(?![\w])", page)]
    assert not missing, missing


def test_the_example_configs_load():
    from offside.configs import MatrixConfig, build

    config = build(MatrixConfig, str(DOCS / "examples" / "matrix-prompt-attacks.yaml"))
    assert config.scenarios == ["complete"] and "robustness" in config.suites and config.robustness.four_bit == []


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """docs/how-to/python-api.md: its first Python block, run in a fresh directory (2 players, a few
    optimizer steps; two vanilla checks and DeepSpeed starts dominate). Slow tier; `.ci/run` runs it."""
    (example,) = code_blocks(DOCS / "how-to" / "python-api.md", ("python",))[:1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "python-api.md", "exec"), namespace)
    result = namespace["result"]
    assert (tmp_path / "runs" / "api" / "eval-gd" / "metrics.json").is_file()
    assert 0 <= result.metrics["forget/image/all/mcq_acc"] <= 1
    assert namespace["vanilla"].run_dir == (tmp_path / "runs" / "api" / "vanilla").resolve()
