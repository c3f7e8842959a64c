"""Training memory of Qwen2.5-VL-3B/7B measured on their CPU twins at real width, scaled by depth,
beside DeepSpeed's own ZeRO estimators — the figures behind cluster/README.md's sizing table.

    python bench/memory_twin.py [--sizes 3b 7b] [--batch-size 4]

For each size, a twin with 2 and with 4 language layers (`offside.models.twin`, bf16, 2 vision
blocks) runs one LoRA NPO step (r 8 on q/v, images 252×252, ZeRO-0, one rank) in a fresh process;
the process's resident memory is sampled every 5 ms. Weights = resident after loading; step = the
peak during the step above that. The step's growth from 2 to 4 layers is the per-layer activation
cost, which scales the step to the published depth. The CPU allocator is not CUDA's, so these are
estimates of what a GPU holds, within a few hundred MB of allocator and workspace differences.
DeepSpeed's estimators (`estimate_zero{2,3}_model_states_mem_needs_all_cold`) count model states of
*full* fine-tuning (16 bytes per trained parameter): with LoRA those states are a few MB, which is
the point of the comparison. Prints a table, then one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GB = 1e9
DEPTH = {"3b": 36, "7b": 28}
PROBE_LAYERS = (2, 4)


def measure_one(size: str, layers: int, batch_size: int) -> dict:
    """In this process: build the twin, load it as a stage does, run one step; resident memory figures."""
    import psutil
    import torch

    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.engine.trainer import TrainSpec, train
    from offside.models.loading import LoraSpec, ModelSpec, build_or_load
    from offside.models.twin import qwen_twin
    from offside.stages import training_rows
    from offside.unlearn import get_method

    torch.set_num_threads(2)
    process = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        rows = materialise(load_benchmark("tests/golden/data")["forget"])
        texts = [r[c] for r in rows for c in ("question", "answer")]
        twin = qwen_twin(f"{tmp}/twin", texts, size=size, layers=layers, vision_blocks=2)
        batch = [r for r in training_rows(rows, ["image"])][:batch_size]
        model, processor = build_or_load(ModelSpec(str(twin), dtype="bf16", device="cpu", lora=LoraSpec(r=8, alpha=16)))
        params = sum(p.numel() for p in model.parameters())
        loaded = process.memory_info().rss
        peak, done = [loaded], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        train(model, processor, get_method("npo"), {"forget": batch},
              TrainSpec(epochs=1, batch_size=len(batch), lr=1e-5, warmup_ratio=0.0), progress=False)
        done.set()
        sampler.join()
        tokens = int(processor.encode([r["question"] for r in batch], [r["image"] for r in batch],
                                      [r["answer"] for r in batch]).inputs["attention_mask"].sum())
    return {"params": params, "loaded_gb": loaded / GB, "step_gb": (peak[0] - loaded) / GB, "tokens": tokens}


def deepspeed_estimates(size: str) -> dict:
    """DeepSpeed's model-state estimates for full fine-tuning of the published model on 2 GPUs (GB per GPU)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from offside.models.twin import twin_config

    config = twin_config(size)
    text = config.text_config
    layer = 4 * text.hidden_size * text.hidden_size + 3 * text.hidden_size * text.intermediate_size  # upper bound
    total = published_params(size)
    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=2, num_nodes=1, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, layer, num_gpus_per_node=2, num_nodes=1,
                                                        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return {"ds_zero2_full_ft_gb": zero2 / GB, "ds_zero3_full_ft_gb": zero3 / GB}


def published_params(size: str) -> int:
    """Parameters of the published model, counted on the meta device from its configuration."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from offside.models.twin import twin_config

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(twin_config(size))
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["3b", "7b"], choices=list(DEPTH))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "LAYERS"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.batch_size)))
        return 0
    figures = {}
    print(f"{'model':<6} {'params':>8} {'weights GB':>10} {'step GB':>8} {'per layer':>9} {'full depth':>10} "
          f"{'DS ZeRO-2 full FT':>17} {'DS ZeRO-3 full FT':>17}")
    for size in args.sizes:
        runs = {layers: child(size, layers, args.batch_size) for layers in PROBE_LAYERS}
        per_layer = (runs[4]["step_gb"] - runs[2]["step_gb"]) / 2
        full_step = runs[2]["step_gb"] + (DEPTH[size] - 2) * per_layer
        total = published_params(size)
        weights = 2 * total / GB  # bf16
        ds = deepspeed_estimates(size)
        row = {"params_b": total / 1e9, "weights_gb": weights, "step_per_layer_gb": per_layer,
               "step_full_depth_gb": full_step, "step_2_layers_gb": runs[2]["step_gb"],
               "tokens_per_step": runs[2]["tokens"], "batch_size": args.batch_size, **ds}
        figures[size] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(f"{size:<6} {total / 1e9:>7.2f}B {weights:>10.1f} {runs[2]['step_gb']:>8.2f} {per_layer:>9.3f} "
              f"{full_step:>10.1f} {ds['ds_zero2_full_ft_gb']:>17.1f} {ds['ds_zero3_full_ft_gb']:>17.1f}")
    print(json.dumps(figures))
    return 0


def child(size: str, layers: int, batch_size: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", size, str(layers), "--batch-size", str(batch_size)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{size} with {layers} layers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
