"""GPU check of the real-scale path, on a CUDA machine.

    python bench/gpu_check.py [--size 3b|7b] [--layers N] [--steps N] [--peak-tflops F]
    python bench/gpu_check.py --model /models/Qwen2.5-VL-7B-Instruct   # a downloaded checkpoint
    python bench/gpu_check.py --nproc 4                                 # + the step on 4 GPUs, NCCL, torchrun
    python bench/gpu_check.py --tiny [--nproc 2]   # the tiny model on CPU (gloo); the default tests run this

The model is a checkpoint directory (`--model`: its own tokenizer and image size), or a random-weight
twin of Qwen2.5-VL-3B/7B at full depth (`offside.models.twin`); the data a small synthetic benchmark.
With the model in bf16 on the GPU (`model.device: auto`), one stage at a time (each stage's model is
freed before the next loads, so each peak is its own):
- a LoRA NPO unlearning step under ZeRO-0, 2 and 3 on one rank (ZeRO-3 loads the weights
  partitioned): tokens/s, model FLOPs utilisation, peak GPU memory (weights included);
- evaluation throughput: multiple choice (log-likelihood) and greedy generation, items/s;
- the int8 quantisation attack's copy of the GPU model (on the CPU; the GPU model untouched);
- one Serve request's latency for the unlearned adapter (`/v1/probe`, after one warm-up request);
- with `--nproc N`, the unlearning step again under torchrun on N GPUs with NCCL (ZeRO-2 and 3);
and asserts that every stage's parameters and activations are on the GPU. Prints a table, then one
JSON line.

Model FLOPs of a step (`step_flops`), counted from the batch as the model runs it: the language
model's linear layers at every real token, causal attention (QKᵀ and AV over the positions before
each token), the LM head only at the positions the loss projects (`logits_to_keep`: the answer
positions), and the vision tower at its own token count (patches, windowed attention, full attention
in its full-attention blocks, the merger at the merged tokens). NPO with LoRA on the language model
runs the policy forward, its backward to the activations (linear and head layers once more,
attention twice: both of its operands are activations; LoRA's own weight gradients are negligible),
and the reference forward (adapters off); the vision tower, which nothing trains, runs forward twice
and never backward. MFU divides by the dense bf16 peak of the GPU named in the output (`peak`): H100
SXM and H200 989 TFLOP/s, H100/H200 NVL 835, H100 PCIe 756; `--peak-tflops` for any other."""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from offside.data.loader import load_benchmark  # noqa: E402
from offside.data.rows import materialise  # noqa: E402
from offside.data.synth import generate as synthesise  # noqa: E402
from offside.engine import comm  # noqa: E402
from offside.engine.trainer import TrainSpec, train  # noqa: E402
from offside.eval.evaluate import EvalSpec, predict  # noqa: E402
from offside.eval.robustness import quantised_int8  # noqa: E402
from offside.models.loading import LoraSpec, ModelSpec, build_or_load, resolve_device, save  # noqa: E402
from offside.models.twin import qwen_twin  # noqa: E402
from offside.stages import training_rows  # noqa: E402
from offside.unlearn import get_method  # noqa: E402

# Dense bf16 tensor peaks (TFLOP/s), matched in this order against torch's device name (an H100 SXM
# calls itself "NVIDIA H100 80GB HBM3"); --peak-tflops for anything else.
PEAK_BF16_TFLOPS = (("H200 NVL", "H200 NVL", 835.0), ("H200", "H200 SXM", 989.0), ("H100 NVL", "H100 NVL", 835.0),
                    ("H100 PCIe", "H100 PCIe", 756.0), ("H100", "H100 SXM", 989.0), ("A100", "A100", 312.0),
                    ("L40S", "L40S", 362.0), ("L4", "L4", 121.0), ("A10G", "A10G", 70.0))
ZERO_STAGES = (0, 2, 3)
DISTRIBUTED_STAGES = (2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="the tiny model on CPU, fp32 (a check that the script runs)")
    which.add_argument("--model", help="a downloaded Qwen2.5-VL checkpoint directory (its tokenizer and image size)")
    parser.add_argument("--size", default="3b", choices=["3b", "7b"], help="the twin's size (without --model)")
    parser.add_argument("--layers", type=int, help="the twin's language layers (default: the published depth)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per ZeRO stage (after one untimed)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=1, help="also run the unlearning step on this many GPUs (NCCL, torchrun)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    parser.add_argument("--distributed-step", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)  # a torchrun worker
    args = parser.parse_args()
    device = resolve_device("cpu" if args.tiny else "auto")
    if args.distributed_step:
        return distributed_worker(args, device)
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: torch sees no CUDA GPU; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.nproc > 1 and device.type == "cuda" and torch.cuda.device_count() < args.nproc:
        print(f"gpu_check: --nproc {args.nproc} needs {args.nproc} GPUs, torch sees {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    if args.model and not Path(args.model, "config.json").is_file():
        print(f"gpu_check: --model {args.model} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(Path(tmp), args, device)
    print_table(figures)
    print(json.dumps(figures))
    return 0


def run(tmp: Path, args, device: torch.device) -> dict:
    bench = load_benchmark(synthesise(tmp / "bench", players=4, seed=0))
    rows = {split: materialise(bench[split]) for split in ("forget", "retain")}
    texts = [r[c] for split in rows.values() for r in split for c in ("question", "answer")]
    start = time.perf_counter()
    base = model_dir(tmp, args, texts)
    name = "tiny" if args.tiny else args.model or f"qwen2.5-vl-{args.size} twin"
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name,
               "build_s": round(time.perf_counter() - start, 1)}
    figures |= peak_of(figures["device"], args.peak_tflops)
    spec = model_spec(base, args, device)
    forget = training_rows(rows["forget"], ["image", "text"])
    for stage in ZERO_STAGES:
        step, model, processor = unlearning_step(spec, forget, stage, args, device, figures.get("peak_tflops"))
        figures |= {f"zero{stage}_{k}": v for k, v in step.items()}
        if stage == 0:
            save(model, processor, tmp / "npo")  # the adapter, relative to its base
            figures |= evaluation(model.eval(), processor, rows["forget"], device)
            figures |= int8_attack_copy(model, processor, rows["forget"], device)
        del model, processor
        free(device)
    if args.nproc > 1:
        figures |= distributed_steps(base, tmp, args)
    figures["serve_latency_s"] = serve_latency(tmp / "npo", spec, rows["forget"][0])
    return figures


def model_dir(tmp: Path, args, texts: list[str]) -> Path:
    if args.model:
        return Path(args.model).resolve()
    if not args.tiny:
        return qwen_twin(tmp / "twin", texts, size=args.size, layers=args.layers)
    model, processor = build_or_load(ModelSpec("tiny", device="cpu"), texts)
    save(model, processor, tmp / "tiny")
    return tmp / "tiny"


def model_spec(base: Path, args, device: torch.device) -> ModelSpec:
    return ModelSpec(str(base), dtype="fp32" if args.tiny else "bf16", device=device.type, lora=LoraSpec(r=8, alpha=16, dropout=0.0))


def peak_of(device_name: str, given: float | None) -> dict:
    """{"peak": the name of the peak MFU divides by, "peak_tflops": its dense bf16 TFLOP/s}, or {}."""
    if given:
        return {"peak": "--peak-tflops", "peak_tflops": given}
    for pattern, name, tflops in PEAK_BF16_TFLOPS:
        if pattern in device_name:
            return {"peak": name, "peak_tflops": tflops}
    return {}


def free(device: torch.device) -> None:
    """Returns what the last stage held (its model, DeepSpeed engine, optimizer) before the next loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class DeviceWatch:
    """Records the device type of the vision tower's and the LM head's outputs while attached."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.seen: set[str] = set()
        self.handles = [m.register_forward_hook(self._record) for m in (base.model.visual, base.get_output_embeddings())]

    def _record(self, _module, _inputs, output):
        self.seen.add((output if torch.is_tensor(output) else output[0]).device.type)  # a tensor, tuple or ModelOutput

    def check(self, device: torch.device, where: str) -> None:
        for handle in self.handles:
            handle.remove()
        assert self.seen == {device.type}, f"{where}: activations on {self.seen}, expected {device.type}"


def unlearning_step(spec: ModelSpec, rows: list[dict], stage: int, args, device: torch.device, peak: float | None):
    """(figures, the trained model, its processor). Each epoch is one optimizer step on the same
    `batch_size` rows; the step time is the median gap between epoch ends after the first (which holds
    DeepSpeed's set-up and first-call costs). The peak memory includes loading (ZeRO-3: partitioned)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_spec = TrainSpec(epochs=1 + args.steps, batch_size=args.batch_size, lr=1e-5, warmup_ratio=0.0, zero_stage=stage)
    model, processor = build_or_load(spec, train=train_spec)
    placed = {p.device.type for p in model.parameters()}
    assert placed == {device.type}, f"ZeRO-{stage}: parameters on {placed}, expected {device.type}"
    batch = rows[: args.batch_size]
    watch = DeviceWatch(model)
    ends = []
    train(model, processor, get_method("npo"), {"forget": batch}, train_spec,
          callbacks=[lambda *_: ends.append(time.perf_counter())], progress=False)
    watch.check(device, f"ZeRO-{stage} unlearning")
    step_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    inputs = encode(processor, batch)
    figures = {"tokens_per_s": round(int(inputs["attention_mask"].sum()) * comm.world_size() / step_s, 1), "step_s": round(step_s, 4)}
    if device.type == "cuda":
        figures["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if peak:  # every rank runs a batch like this one
            figures["mfu"] = round(step_flops(model.config, inputs)["total"] / step_s / (peak * 1e12), 4)
    return figures, model, processor


def encode(processor, batch: list[dict]) -> dict:
    return processor.encode([r["question"] for r in batch], [r["image"] for r in batch], [r["answer"] for r in batch]).inputs


def step_flops(config, inputs: dict) -> dict[str, float]:
    """Model FLOPs of one NPO step with LoRA on the language model over the encoded batch `inputs`
    (module docstring): {"linear", "attention", "head", "vision", "total"}."""
    text, vision = config.text_config, config.vision_config
    h, heads, head_dim = text.hidden_size, text.num_attention_heads, text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    layer_weights = h * h + 2 * h * kv + h * h + 3 * h * text.intermediate_size
    lengths = inputs["attention_mask"].sum(-1).tolist()
    tokens = sum(lengths)
    linear = 2 * layer_weights * tokens * text.num_hidden_layers
    attention = sum(2 * heads * head_dim * n * (n + 1) for n in lengths) * text.num_hidden_layers  # QKᵀ + AV, causal
    kept = int((inputs["labels"][:, 1:] != -100).any(0).sum())
    head = 2 * h * text.vocab_size * kept * len(lengths)
    image = sum(vision_flops(vision, *grid) for grid in inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    total = 3 * linear + 4 * attention + 3 * head + 2 * image
    return {"linear": linear, "attention": attention, "head": head, "vision": image, "total": total}


def vision_flops(vision, frames: int, rows: int, cols: int) -> float:
    """One forward pass of the vision tower over one image of rows × cols patches."""
    d, patches = vision.hidden_size, frames * rows * cols
    block = 2 * (4 * d * d + 3 * d * vision.intermediate_size) * patches  # qkv + proj, gate/up/down
    side = vision.window_size // vision.patch_size  # a window's side in patches
    windows = [a * b for a in _cuts(rows, side) for b in _cuts(cols, side)]
    windowed = 4 * d * frames * sum(n * n for n in windows)
    full = 4 * d * patches * patches
    blocks = sum(block + (full if i in vision.fullatt_block_indexes else windowed) for i in range(vision.depth))
    embed = 2 * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * d * patches
    merged = patches // vision.spatial_merge_size ** 2
    width = d * vision.spatial_merge_size ** 2
    merger = 2 * (width * width + width * vision.out_hidden_size) * merged
    return blocks + embed + merger


def _cuts(length: int, side: int) -> list[int]:
    return [min(side, length - start) for start in range(0, length, side)]


def evaluation(model, processor, rows: list[dict], device: torch.device) -> dict:
    watch = DeviceWatch(model)
    spec = EvalSpec(max_new_tokens=16)
    out = {}
    for form in ("mcq", "gen"):
        items = [r for r in rows if r["form"] == form][:32]
        predict(model, processor, items[:2], form, spec)  # warm-up
        start = time.perf_counter()
        predict(model, processor, items, form, spec)
        out[f"eval_{form}_items_per_s"] = round(len(items) / (time.perf_counter() - start), 2)
    watch.check(device, "evaluation")
    return out


def int8_attack_copy(model, processor, rows: list[dict], device: torch.device) -> dict:
    """The int8 quantisation attack's copy of the trained model: on the CPU, answering, the model itself
    left on its device."""
    start = time.perf_counter()
    quantised = quantised_int8(model)
    answers = predict(quantised, processor, [r for r in rows if r["form"] == "gen"][:2], "gen", EvalSpec(max_new_tokens=8))
    assert {p.device.type for p in model.parameters()} == {device.type} and len(answers) == 2
    assert {p.device.type for p in quantised.parameters()} == {"cpu"}
    return {"int8_attack_copy_s": round(time.perf_counter() - start, 2)}


def distributed_steps(base: Path, tmp: Path, args) -> dict:
    """The unlearning step under torchrun on `--nproc` ranks (NCCL on GPUs, gloo with --tiny)."""
    out = tmp / "distributed.json"
    forwarded = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    forwarded += ["--tiny"] if args.tiny else []
    forwarded += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, *forwarded, "--distributed-step", str(base), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"gpu_check: the {args.nproc}-rank step failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def distributed_worker(args, device: torch.device) -> int:
    """One torchrun rank: the unlearning step under each of DISTRIBUTED_STAGES; rank 0 writes the figures."""
    import torch.distributed as dist

    from offside.engine.trainer import ensure_distributed

    ensure_distributed()
    model, out = Path(args.distributed_step[0]), Path(args.distributed_step[1])
    bench = load_benchmark(synthesise(out.parent / f"bench-rank{comm.rank()}", players=4, seed=0))
    forget = training_rows(materialise(bench["forget"]), ["image", "text"])
    peak = args.peak_tflops or peak_of(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", None).get("peak_tflops")
    prefix = f"{dist.get_backend()}{comm.world_size()}"
    figures = {"backend": dist.get_backend(), "nproc": comm.world_size()}
    for stage in DISTRIBUTED_STAGES:
        step, trained, _ = unlearning_step(model_spec(model, args, device), forget, stage, args, device, peak)
        figures |= {f"{prefix}_zero{stage}_{k}": v for k, v in step.items()}
        del trained
        free(device)
    if comm.rank() == 0:
        out.write_text(json.dumps(figures))
    comm.barrier()
    return 0


def serve_latency(adapter: Path, spec: ModelSpec, row: dict) -> float:
    import requests

    from serve.local import start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start({"models": {"npo": str(adapter)}, "dtype": spec.dtype, "device": "auto" if spec.device != "cpu" else "cpu",
                 "max_new_tokens": 16}, port, num_cpus=2, quiet=True)
    try:
        import base64
        import io

        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        body = {"model": "npo", "question": row["question"], "image": base64.b64encode(buffer.getvalue()).decode()}
        for _ in range(2):  # the first request loads the model
            start_s = time.perf_counter()
            response = requests.post(f"{url}/v1/probe", json=body, timeout=600)
            response.raise_for_status()
        return round(time.perf_counter() - start_s, 3)
    finally:
        stop()


def print_table(figures: dict) -> None:
    print(f"{figures['model']} on {figures['device']} (built in {figures['build_s']} s); "
          f"MFU against {figures.get('peak', 'no known peak')} {figures.get('peak_tflops', '')} TFLOP/s")
    print(f"{'run':<12} {'tokens/s':>10} {'step s':>8} {'peak GB':>8} {'MFU':>7}")
    runs = [f"zero{stage}" for stage in ZERO_STAGES]
    if "backend" in figures:  # the torchrun run: e.g. nccl4_zero2, nccl4_zero3
        runs += [f"{figures['backend']}{figures['nproc']}_zero{stage}" for stage in DISTRIBUTED_STAGES]
    for run_name in runs:
        f = {k.removeprefix(run_name + "_"): v for k, v in figures.items() if k.startswith(run_name + "_")}
        if "tokens_per_s" in f:
            print(f"{run_name:<12} {f['tokens_per_s']:>10} {f['step_s']:>8} {f.get('peak_memory_gb', 'n/a'):>8} {f.get('mfu', 'n/a'):>7}")
    print(f"evaluation: {figures['eval_mcq_items_per_s']} mcq items/s, {figures['eval_gen_items_per_s']} gen items/s; "
          f"int8 attack copy {figures['int8_attack_copy_s']} s; serve /v1/probe: {figures['serve_latency_s']} s")


if __name__ == "__main__":
    sys.exit(main())
