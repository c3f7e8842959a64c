"""Where and how stages hold the model: one device setting, one dtype for every model a stage loads
(reference models included), and LoRA stages that save their adapter (what every loader reads)
rather than a merged copy of the base."""

import json
import os
import shutil
from pathlib import Path
from dataclasses import replace

import pytest
import torch

from offside.cli import main
from offside.config import from_dict
from offside.data.loader import load_benchmark
from offside.data.rows import materialise
from offside.engine.trainer import TrainSpec, train
from offside.errors import OffsideError
from offside.eval.evaluate import EvalSpec, evaluate
from offside.models.loading import DTYPES, LoraSpec, ModelSpec, apply_lora, build_or_load, resolve_device, resolved_dtype, save
from offside.stages import UnlearnConfig, export_merged, unlearn
from offside.unlearn import get_method
from tune_jobs.spec import sweep_from_dict
from tune_jobs.sweep import _static

GOLDEN = "tests/golden"
SPEC = EvalSpec(splits=["forget", "retain"], forms=["mcq", "gen"], limit=6)
ONE_EPOCH = TrainSpec(epochs=1, lr=3e-3, batch_size=8, warmup_ratio=0.0)


def test_the_device_setting_is_resolved_in_one_place():
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OffsideError, match=r"model.device: 'gpu' is not a device \(valid: auto, cpu, cuda, cuda:N\)"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(OffsideError, match="model.device: cuda:1 asked for, but torch sees no CUDA GPU"):
            build_or_load(ModelSpec(f"{GOLDEN}/model", device="cuda:1"))
    config = from_dict(UnlearnConfig, {"model": {"device": "cpu", "dtype": "bf16"}}, "cfg")
    assert (config.model.device, config.model.dtype) == ("cpu", "bf16")


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_model_of_a_stage_is_in_the_configured_dtype(dtype, torch_dtype):
    model, _ = build_or_load(ModelSpec(f"{GOLDEN}/model", dtype=dtype))
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    npo = get_method("npo", {"reference": f"{GOLDEN}/model"})
    npo.setup(model, torch.device("cpu"))
    assert {p.dtype for p in npo.reference_model.parameters()} == {torch_dtype}


def test_a_sweep_carries_its_dtype_to_its_trials(tmp_path):
    base = {"name": "s", "data": "d", "vanilla": "v", "search_space": {"train.lr": {"choice": [1e-3]}}}
    config = sweep_from_dict({**base, "dtype": "bf16"})
    assert _static(config, tmp_path, "sqlite://", "parent", {})["dtype"] == "bf16"  # what train_worker loads with
    with pytest.raises(OffsideError, match="'dtype': unknown 'fp64'"):
        sweep_from_dict({**base, "dtype": "fp64"})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The golden vanilla model copied into a runs tree, a GA unlearning with LoRA on it, and a
    second LoRA stage (GD) on top of GA's adapter."""
    runs = tmp_path_factory.mktemp("runs")
    shutil.copytree(f"{GOLDEN}/model", runs / "vanilla")
    lora = LoraSpec(r=4, groups=["language", "vision"])
    first = UnlearnConfig(data=f"{GOLDEN}/data", out=str(runs / "ga"), method="ga", train=ONE_EPOCH,
                          model=ModelSpec(str(runs / "vanilla"), lora=lora))
    unlearn(first, progress=False)
    unlearn(replace(first, out=str(runs / "gd"), method="gd", model=ModelSpec(str(runs / "ga"), lora=lora)), progress=False)
    return runs


def _scores(model_dir: str) -> dict[str, float]:
    model, processor = build_or_load(ModelSpec(model_dir))
    bench = load_benchmark(f"{GOLDEN}/data")
    rows = {s: materialise(bench[s]) for s in SPEC.splits}
    return evaluate(model.eval(), processor, rows, SPEC, progress=False)[0]


def test_a_lora_stage_saves_its_adapter_relative_to_its_base(adapters):
    ga = adapters / "ga"
    assert (ga / "adapter_model.safetensors").exists() and not (ga / "model.safetensors").exists()
    assert (ga / "adapter_model.safetensors").stat().st_size < (adapters / "vanilla" / "model.safetensors").stat().st_size / 5
    assert json.loads((ga / "adapter_config.json").read_text())["base_model_name_or_path"] == "../vanilla"
    assert json.loads((adapters / "gd" / "adapter_config.json").read_text())["base_model_name_or_path"] == "../ga"
    assert _scores(str(ga)) != _scores(str(adapters / "vanilla"))  # the adapter is what unlearning changed


def test_an_adapter_scores_as_its_merged_export_and_moves_with_its_tree(adapters, tmp_path):
    for name in ("ga", "gd"):
        assert main(["export", "--model", str(adapters / name), "--out", str(tmp_path / f"{name}-merged")]) == 0
        merged = tmp_path / f"{name}-merged"
        assert (merged / "model.safetensors").exists() and (merged / "config.yaml").exists()
        assert json.loads((merged / "export.json").read_text())["from"] == str(adapters / name)
        assert _scores(str(adapters / name)) == _scores(str(merged))
    moved = tmp_path / "moved"
    shutil.copytree(adapters, moved, ignore=shutil.ignore_patterns("mlflow.db"))
    assert _scores(str(moved / "gd")) == _scores(str(tmp_path / "gd-merged"))
    with pytest.raises(OffsideError, match="its base model '../ga' does not exist"):
        shutil.rmtree(moved / "ga")
        build_or_load(ModelSpec(str(moved / "gd")))


def test_lora_on_an_adapter_starts_from_that_adapters_model(adapters):
    """NPO's and KL's "vanilla" reference is the model with its adapters off: for LoRA on a saved
    adapter that must be the adapted model it was trained from, not the adapter's own base."""
    loaded, processor = build_or_load(ModelSpec(str(adapters / "ga"), lora=LoraSpec(r=4)))
    plain, _ = build_or_load(ModelSpec(str(adapters / "ga")))
    rows = materialise(load_benchmark(f"{GOLDEN}/data")["forget"])[:4]
    inputs = processor.encode([r["question"] for r in rows], [r["image"] for r in rows]).inputs
    with torch.no_grad(), loaded.disable_adapter():
        assert torch.equal(loaded.eval()(**inputs).logits, plain.eval()(**inputs).logits)
    with pytest.raises(OffsideError, match="already exists"):
        export_merged(str(adapters / "ga"), str(adapters / "vanilla"))


@pytest.mark.parametrize("lora", [LoraSpec(r=4), None], ids=["lora", "full"])
def test_a_zero3_stage_saves_the_weights_it_trained(tmp_path, lora):
    """ZeRO-3 partitions the parameters (those over DeepSpeed's persistence threshold hold an empty
    tensor between forward passes); the stage's save gathers them, so what it saves matches the same
    run under ZeRO-0."""
    from safetensors.torch import load_file

    saved = {}
    for stage in (0, 3):
        config = UnlearnConfig(data=f"{GOLDEN}/data", out=str(tmp_path / f"zero{stage}"), method="ga",
                               train=replace(ONE_EPOCH, zero_stage=stage), model=ModelSpec(f"{GOLDEN}/model", lora=lora))
        run_dir = unlearn(config, progress=False).run_dir
        saved[stage] = load_file(run_dir / ("adapter_model.safetensors" if lora else "model.safetensors"))
    assert saved[0].keys() == saved[3].keys()
    if lora:
        assert any(w.abs().sum() > 0 for n, w in saved[3].items() if "lora_B" in n)
    # Full fine-tuning under ZeRO-3 sums in another order: measured 2.6e-5 apart where training moved
    # the weights 1.2e-2.
    tolerance = 1e-5 if lora else 1e-4
    for name, weight in saved[0].items():
        assert saved[3][name].shape == weight.shape and torch.allclose(saved[3][name], weight, atol=tolerance), name


def test_manifests_record_the_model_and_reports_read_them_from_anywhere(adapters, monkeypatch, tmp_path):
    from offside.provenance import directory_sha256
    from offside.report.report import load_run
    from offside.stages import EvalConfig, evaluate_model

    manifest = json.loads((adapters / "gd" / "manifest.json").read_text())
    assert manifest["model_path"] == str(adapters / "ga") and manifest["model_revision"] is None
    assert manifest["model_sha256"] == directory_sha256(adapters / "ga") != directory_sha256(adapters / "vanilla")
    assert (manifest["dtype"], manifest["device"], manifest["world_size"], manifest["zero_stage"]) == ("fp32", "cpu", 1, 0)

    data = str(Path(f"{GOLDEN}/data").resolve())
    monkeypatch.chdir(adapters)  # an eval named with relative paths, as a user in the runs tree types it
    result = evaluate_model(EvalConfig(data=data, out="eval-gd", model=ModelSpec("gd"),
                                       eval=EvalSpec(splits=["forget"], forms=["mcq"], limit=2), suites=["efficacy"]), progress=False)
    assert result.run_dir == adapters / "eval-gd"
    monkeypatch.chdir(tmp_path)
    run = load_run(result.run_dir)
    assert (run.method, run.scenario) == ("gd", "complete")


def test_the_endpoint_serves_stage_adapters_in_its_dtype(adapters, tmp_path):
    """LoRA stages' adapters registered by their directories: the replica finds each base relative to
    its adapter (for GD, GA's adapter, loaded merged), holds every model in the configured dtype, and
    answers a batch mixing them as the merged models `offside eval` scores. These adapters have LoRA
    in the vision tower, where PEFT cannot mix adapters per row: each runs in its own group."""
    from offside.eval.scoring import option_logliks
    from serve.runner import Job, ModelPool
    from serve.settings import load_settings, registry, replica_gpus

    runs = tmp_path / "runs"
    shutil.copytree(adapters, runs, ignore=shutil.ignore_patterns("mlflow.db"))
    shutil.copytree(runs / "ga", runs / "ga-copy")  # a second adapter on the same base
    names = ("ga", "ga-copy", "gd")
    settings = load_settings({"models": {name: str(runs / name) for name in names}})
    entries = registry(settings)
    assert entries["gd"].base == str(runs / "ga") and entries["ga"].base == entries["ga-copy"].base == str(runs / "vanilla")
    rows = [r for r in materialise(load_benchmark(f"{GOLDEN}/data")["forget"]) if r["form"] == "mcq"][:3]
    jobs = [Job(name, r["question"], r["image"], r["options"]) for r in rows for name in names]
    want = {}
    for name in ("ga", "gd"):
        merged, processor = build_or_load(ModelSpec(str(runs / name)))
        want[name] = option_logliks(merged.eval(), processor, rows, batch_size=len(rows))
    want["ga-copy"] = want["ga"]
    for dtype, tolerance in (("fp32", 1e-5), ("bf16", 0.03)):  # bf16: measured ≤ 2 %
        pool = ModelPool(entries, dtype, "cpu")
        loaded = {name: pool.load(name) for name in names}
        assert {p.dtype for p in loaded["gd"].base.peft.parameters()} == {DTYPES[dtype]}
        assert loaded["ga"].base.vision_adapters == {loaded["ga"].adapter_name, loaded["ga-copy"].adapter_name}
        got = pool.run(jobs, loaded)
        for job, answer in zip(jobs, got):
            expected = want[job.model][rows.index(next(r for r in rows if r["question"] == job.question))]
            assert all(abs(a - b) < tolerance * max(1.0, abs(a)) for a, b in zip(expected, answer["logliks"])), (dtype, job.model)
            assert answer["choice"] == expected.index(max(expected))
    with pytest.raises(OffsideError, match="device 'cuda:1'"):
        load_settings({"models": {"ga": str(runs / "ga")}, "device": "cuda:1"})
    with pytest.raises(OffsideError, match="dtype 'int8'"):
        load_settings({"models": {"ga": str(runs / "ga")}, "dtype": "int8"})
    shutil.rmtree(runs / "ga")
    with pytest.raises(OffsideError, match="models.gd: .*base model"):
        load_settings({"models": {"gd": str(runs / "gd")}})
    gpus = {device: [replica_gpus(replace(settings, device=device), cluster) for cluster in (0, 8)]
            for device in ("auto", "cpu", "cuda")}
    assert gpus == {"auto": [0, 1], "cpu": [0, 0], "cuda": [1, 1]}


def test_a_full_model_vanilla_reference_under_zero3_is_refused_with_the_way_out(tmp_path):
    config = UnlearnConfig(data=f"{GOLDEN}/data", out=str(tmp_path / "npo"), method="npo", model=ModelSpec(f"{GOLDEN}/model"),
                           train=replace(ONE_EPOCH, zero_stage=3, max_steps=1))
    with pytest.raises(OffsideError, match="npo: a 'vanilla' reference under ZeRO-3 needs LoRA"):
        unlearn(config, progress=False)
    assert not (tmp_path / "npo").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_the_gpu_check_runs_on_cpu_with_the_tiny_model(nproc):
    """bench/gpu_check.py is for a CUDA machine; --tiny runs the same code on the CPU so it cannot rot,
    its torchrun step (--nproc) too, with gloo (slow tier: about a minute each, a subprocess that
    starts DeepSpeed, evaluates, quantises and serves)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--steps", "2", "--nproc", str(nproc)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert any(line.startswith("zero3") for line in lines) and figures["device"] == "cpu"
    torchrun = ("gloo2_zero2", "gloo2_zero3") if nproc == 2 else ()
    for run in ("zero0", "zero2", "zero3", *torchrun):
        assert figures[f"{run}_tokens_per_s"] > 0 and figures[f"{run}_step_s"] > 0, run
    assert (figures.get("backend"), figures.get("nproc")) == (("gloo", 2) if nproc == 2 else (None, None))
    assert figures["eval_mcq_items_per_s"] > 0 and figures["eval_gen_items_per_s"] > 0 and figures["serve_latency_s"] > 0
    assert figures["int8_attack_copy_s"] > 0
    no_gpu = subprocess.run([sys.executable, "bench/gpu_check.py"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert no_gpu.returncode == 2 and "no CUDA GPU" in no_gpu.stderr


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_checks_flops_are_the_flops_the_model_runs():
    """MFU's numerator: the forward FLOPs `step_flops` counts (linear layers, attention, the LM head at
    the answer positions only, the vision tower at its own token count) are those torch's FLOP counter
    sees in the forward pass the loss runs, attention counted over the causal half; and the peak it
    divides by is named for each GPU kind."""
    from torch.utils.flop_counter import FlopCounterMode

    from offside.engine.losses import answer_logits

    gpu_check = _gpu_check()
    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    row = next(r for r in materialise(load_benchmark(f"{GOLDEN}/data")["forget"]) if r["form"] == "gen" and r["image"])
    inputs = processor.encode([row["question"]], [row["image"]], [row["answer"]]).inputs
    counted = gpu_check.step_flops(model.config, inputs)
    model.set_attn_implementation("eager")  # attention as matmuls, which the counter counts (CPU sdpa: not)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        answer_logits(model.eval(), inputs)
    tokens = int(inputs["attention_mask"].sum())
    full_attention = counted["attention"] * 2 * tokens / (tokens + 1)  # the counter counts every query × key
    forward = counted["linear"] + full_attention + counted["head"] + counted["vision"]
    assert counter.get_total_flops() == pytest.approx(forward, rel=1e-9)
    assert counted["total"] == 3 * counted["linear"] + 4 * counted["attention"] + 3 * counted["head"] + 2 * counted["vision"]
    assert gpu_check.peak_of("NVIDIA H100 80GB HBM3", None) == {"peak": "H100 SXM", "peak_tflops": 989.0}
    assert gpu_check.peak_of("NVIDIA H100 PCIe", None) == {"peak": "H100 PCIe", "peak_tflops": 756.0}
    assert gpu_check.peak_of("NVIDIA H200", None) == {"peak": "H200 SXM", "peak_tflops": 989.0}
    assert gpu_check.peak_of("NVIDIA H100 PCIe", 500.0) == {"peak": "--peak-tflops", "peak_tflops": 500.0}


def test_a_checkpoint_loads_in_its_own_dtype_by_default(tmp_path):
    """model.dtype auto: a published checkpoint (saved in bf16) loads in bf16, the tiny model and a
    saved tiny model (fp32) in fp32, an adapter in its base's dtype; the manifest records what it was."""
    golden, processor = build_or_load(ModelSpec(f"{GOLDEN}/model"))
    assert ModelSpec().dtype == "auto" and {p.dtype for p in golden.parameters()} == {torch.float32}
    golden.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    processor.tokenizer.save_pretrained(tmp_path / "bf16")
    loaded, _ = build_or_load(ModelSpec(str(tmp_path / "bf16")))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    adapted = apply_lora(loaded, LoraSpec(r=4))
    save(adapted, processor, tmp_path / "adapter")
    assert resolved_dtype(ModelSpec(str(tmp_path / "adapter"))) == "bf16"
    assert resolved_dtype(ModelSpec("tiny")) == "fp32" and resolved_dtype(ModelSpec(str(tmp_path / "bf16"), dtype="fp32")) == "fp32"
    with pytest.raises(OffsideError, match="model.dtype: unknown dtype 'int8' \\(valid: auto, fp32, bf16, fp16\\)"):
        build_or_load(ModelSpec(str(tmp_path / "bf16"), dtype="int8"))


def test_a_model_placed_off_the_engines_device_is_refused_with_the_reason(monkeypatch):
    """model.device: cpu on a host where DeepSpeed trains on the GPU would be moved there silently: the
    engine refuses it before anything starts, saying how to train on the CPU."""
    import deepspeed.accelerator

    class GpuHost:
        def current_device_name(self):
            return "cuda:0"

    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model", device="cpu"))
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: GpuHost())
    with pytest.raises(OffsideError, match=r"model.device: cpu asked for, but the training engine \(DeepSpeed\) runs on cuda.*CUDA_VISIBLE_DEVICES="):
        train(model, processor, get_method("ga"), {"forget": materialise(load_benchmark(f"{GOLDEN}/data")["forget"])[:4]},
              ONE_EPOCH, progress=False)


@pytest.mark.parametrize("lora", [False, True])
def test_the_int8_attack_quantises_a_cpu_copy_and_leaves_the_model_as_it_was(lora):
    """torch's dynamic int8 kernels are CPU-only: the attack quantises an fp32 copy made on the CPU,
    whatever the model's device, and the model keeps its dtype and weights. A LoRA model (as a LoRA
    stage evaluates it) is quantised merged: PEFT's layers cannot run on quantised adapters."""
    from offside.eval.robustness import quantised_int8
    from offside.eval.scoring import generate

    model, processor = build_or_load(ModelSpec(f"{GOLDEN}/model", dtype="bf16", lora=LoraSpec(r=4) if lora else None))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantised = quantised_int8(model.eval())
    assert {p.device.type for p in quantised.parameters()} == {"cpu"}
    assert {p.dtype for p in quantised.parameters()} == {torch.float32}
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantised.modules())
    assert all(torch.equal(p, before[n]) and p.dtype == torch.bfloat16 for n, p in model.named_parameters())
    row = next(r for r in materialise(load_benchmark(f"{GOLDEN}/data")["forget"]) if r["form"] == "gen")
    assert generate(quantised, processor, [row["question"]], [row["image"]], 1, 8)[0]
