"""lm-evaluation-harness (`lm_eval --model local-completions`) scores the served vanilla model and an
unlearned LoRA adapter through /v1/completions on a task of the benchmark's text-form multiple-choice
rows (a local JSONL file, nothing downloaded), and agrees with `offside eval`'s multiple-choice accuracy.

Both score an option by the summed log-probability of its tokens and the end-of-turn token after the
question's chat prompt, and choose the largest (the harness's `acc`). One difference is the harness's
rule: it moves the context's trailing whitespace — the newline after `assistant` — into every
continuation, so its log-likelihoods are `offside eval`'s plus that newline's log-probability, the same
for each option of a question: the choice, and so the accuracy, is the same. (`acc_norm` divides by the
option's length in bytes: another rule, reported but not compared.)"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.engine.trainer import TrainSpec
from offside.eval.evaluate import EvalSpec
from offside.eval.scoring import option_logliks
from offside.models.loading import LoraSpec, ModelSpec, build_or_load
from offside.stages import EvalConfig, UnlearnConfig, evaluate_model, unlearn
from serve.settings import TOKEN_ENV

GOLDEN = Path(__file__).resolve().parent / "golden"
TOKEN = "harness-token"
TASK = "offside_forget_text_mcq"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """root/base (the golden vanilla model), root/ga (a GA-unlearned LoRA adapter of it), the task's
    rows, and the app serving both."""
    from serve.local import start, stop

    root = tmp_path_factory.mktemp("harness")
    shutil.copytree(GOLDEN / "model", root / "base")
    unlearn(UnlearnConfig(data=str(GOLDEN / "data"), out=str(root / "ga"), method="ga",
                          model=ModelSpec(str(root / "base"), lora=LoraSpec(r=8, alpha=32)),
                          train=TrainSpec(epochs=1, lr=3e-3, batch_size=8, warmup_ratio=0.0, max_steps=4)), progress=False)
    rows = [r for r in materialise(load_benchmark(GOLDEN / "data")["forget"]) if r["modality"] == "text" and r["form"] == "mcq"]
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ[TOKEN_ENV] = TOKEN
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start({"models": {"vanilla": str(root / "base"), "ga": str(root / "ga")}}, port, num_cpus=2, quiet=True)
    yield root, rows, url
    stop()
    os.environ.pop(TOKEN_ENV, None)


def _task(root: Path, rows: list[dict], processor) -> Path:
    """A harness task over the rows: the chat prompt as context, each option + end-of-turn as a choice."""
    folder = root / "task"
    folder.mkdir(exist_ok=True)
    with (folder / "rows.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": processor.prompt(r["question"], False),
                                "choices": [o + "<|im_end|>" for o in r["options"]], "label": r["correct"]}) + "\n")
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "rows.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "choices",
        "doc_to_target": "label", "target_delimiter": "", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return folder


def _harness(url: str, model: str, tokenizer: Path, task: Path, out: Path) -> tuple[float, list[list[float]]]:
    """`lm_eval --model local-completions` against the server: (acc, per row the options' log-likelihoods)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": TOKEN}
    args = f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,max_retries=1"
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                           "--tasks", TASK, "--include_path", str(task), "--batch_size", "8", "--output_path", str(out), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    acc = json.loads(results.read_text())["results"][TASK]["acc,none"]
    docs = sorted((json.loads(line) for line in samples.open()), key=lambda d: d["doc_id"])
    return acc, [[float(choice[0]) for choice in d["filtered_resps"]] for d in docs]  # the harness logs them as strings


@pytest.mark.parametrize("name", ["vanilla", "ga"])
def test_lm_eval_harness_scores_the_served_model_as_offside_eval(setup, name):
    root, rows, url = setup
    directory = root / ("base" if name == "vanilla" else "ga")
    model, processor = build_or_load(ModelSpec(str(directory)))  # the adapter: merged into its base
    acc, harness = _harness(url, name, root / "base", _task(root, rows, processor), root / f"out-{name}")

    spec = EvalSpec(splits=["forget"], modalities=["text"], forms=["mcq"])
    result = evaluate_model(EvalConfig(data=str(GOLDEN / "data"), out=str(root / f"eval-{name}"), model=ModelSpec(str(directory)),
                                       eval=spec, suites=["efficacy"]), progress=False)
    assert acc == pytest.approx(result.metrics["forget/text/all/mcq_acc"], abs=1e-9)

    with torch.no_grad():
        offside = option_logliks(model.eval(), processor, rows, batch_size=8)
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for served, local in zip(harness, offside):
        # the same per question: the newline the harness moved from the context into every option
        shift = [s - l for s, l in zip(served, local)]
        assert max(shift) - min(shift) < 1e-3 and -20 < shift[0] <= 0
        assert max(range(len(served)), key=served.__getitem__) == max(range(len(local)), key=local.__getitem__)
    print(f"{name}: harness acc {acc:.4f} = offside eval mcq_acc {result.metrics['forget/text/all/mcq_acc']:.4f}")
