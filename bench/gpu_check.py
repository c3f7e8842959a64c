"""GPU check of the real-scale path, on one CUDA machine with nothing downloaded.

    python bench/gpu_check.py [--size 3b|7b] [--layers N] [--steps N] [--peak-tflops F]
    python bench/gpu_check.py --tiny          # the tiny model on CPU (the default tests run this)

Builds a random-weight twin of Qwen2.5-VL-3B (or 7B) at full depth (`offside.models.twin`) and a
small synthetic benchmark, then, with the model in bf16 on the GPU (`model.device: auto`):
- a LoRA NPO unlearning step under ZeRO-0, 2 and 3 (one rank): tokens/s, model FLOPs utilisation
  against the GPU's dense bf16 peak, peak GPU memory;
- evaluation throughput: multiple choice (log-likelihood) and greedy generation, items/s;
- one Serve request's latency for the unlearned adapter (`/v1/probe`, after one warm-up request);
and asserts that every stage's parameters and activations are on the GPU. Prints a table, then one
JSON line. Model FLOPs per trained token are 6 × parameters: the policy's forward (2N), its backward
to the activations (2N; LoRA's weight gradients are negligible) and NPO's reference forward (2N)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
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
from offside.engine.trainer import TrainSpec, train  # noqa: E402
from offside.eval.evaluate import EvalSpec, predict  # noqa: E402
from offside.models.loading import LoraSpec, ModelSpec, build_or_load, resolve_device, save  # noqa: E402
from offside.models.twin import qwen_twin  # noqa: E402
from offside.stages import training_rows  # noqa: E402
from offside.unlearn import get_method  # noqa: E402

# Dense bf16 tensor peaks (TFLOP/s) by device name; --peak-tflops for anything else.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
ZERO_STAGES = (0, 2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU, fp32 (a check that the script runs)")
    parser.add_argument("--size", default="3b", choices=["3b", "7b"])
    parser.add_argument("--layers", type=int, help="language layers (default: the published depth)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per ZeRO stage (after one untimed)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    args = parser.parse_args()
    device = resolve_device("cpu" if args.tiny else "auto")
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: torch sees no CUDA GPU; run with --tiny for the CPU check", file=sys.stderr)
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
    base = build_model_dir(tmp, args, texts)
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "model": "tiny" if args.tiny else f"qwen2.5-vl-{args.size} twin", "build_s": round(time.perf_counter() - start, 1)}
    spec = ModelSpec(str(base), dtype="fp32" if args.tiny else "bf16", device=device.type,
                     lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in figures["device"]), None)
    forget = training_rows(rows["forget"], ["image", "text"])
    for stage in ZERO_STAGES:
        timings, model, processor = unlearning_step(spec, forget, stage, args, device, peak)
        figures |= {f"zero{stage}_{k}": v for k, v in timings.items()}
        if stage == 0:
            save(model, processor, tmp / "npo")  # the adapter, relative to its base
            figures |= evaluation(model.eval(), processor, rows["forget"], device)
    figures["serve_latency_s"] = serve_latency(tmp / "npo", spec, rows["forget"][0])
    return figures


def build_model_dir(tmp: Path, args, texts: list[str]) -> Path:
    if not args.tiny:
        return qwen_twin(tmp / "twin", texts, size=args.size, layers=args.layers)
    model, processor = build_or_load(ModelSpec("tiny", device="cpu"), texts)
    save(model, processor, tmp / "tiny")
    return tmp / "tiny"


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
    `batch_size` rows; the step time is the median gap between epoch ends after the first (which
    holds DeepSpeed's set-up and first-call costs)."""
    model, processor = build_or_load(spec)
    placed = {p.device.type for p in model.parameters()}
    assert placed == {device.type}, f"ZeRO-{stage}: parameters on {placed}, expected {device.type}"
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    batch = rows[: args.batch_size]
    watch = DeviceWatch(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ends = []
    train(model, processor, get_method("npo"), {"forget": batch}, TrainSpec(
        epochs=1 + args.steps, batch_size=len(batch), lr=1e-5, warmup_ratio=0.0, zero_stage=stage),
        callbacks=[lambda *_: ends.append(time.perf_counter())], progress=False)
    watch.check(device, f"ZeRO-{stage} unlearning")
    step_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    tokens = sum(int(processor.encode([r["question"]], [r["image"]], [r["answer"]]).inputs["attention_mask"].sum()) for r in batch)
    figures = {"tokens_per_s": round(tokens / step_s, 1), "step_s": round(step_s, 4)}
    if device.type == "cuda":
        figures["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if peak:
            figures["mfu"] = round(6 * params * tokens / step_s / (peak * 1e12), 4)
    return figures, model, processor


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
    print(f"{figures['model']} on {figures['device']} (built in {figures['build_s']} s)")
    print(f"{'ZeRO':<5} {'tokens/s':>10} {'step s':>8} {'peak GB':>8} {'MFU':>7}")
    for stage in ZERO_STAGES:
        f = {k.split("_", 1)[1]: v for k, v in figures.items() if k.startswith(f"zero{stage}_")}
        print(f"{stage:<5} {f['tokens_per_s']:>10} {f['step_s']:>8} {f.get('peak_memory_gb', 'n/a'):>8} {f.get('mfu', 'n/a'):>7}")
    print(f"evaluation: {figures['eval_mcq_items_per_s']} mcq items/s, {figures['eval_gen_items_per_s']} gen items/s; "
          f"serve /v1/probe: {figures['serve_latency_s']} s")


if __name__ == "__main__":
    sys.exit(main())
