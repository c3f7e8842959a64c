"""Training memory of Qwen2.5-VL-3B/7B measured on their CPU twins at real width, scaled by depth,
beside DeepSpeed's own ZeRO estimators — the figures behind cluster/README.md's sizing table.

    python bench/memory_twin.py [--sizes 3b 7b] [--batch-size 4]

For each size, a twin with 2 and with 4 language layers (`offside.models.twin`, bf16, 2 vision
blocks) runs one LoRA NPO forward and backward (r 8 on q/v, images 252×252) in a fresh process,
counting the bytes autograd saves for backward (activations and answer-position logits; not the
weights) at their peak. That count is device-independent — the CPU process's resident memory is
not a GPU's (oneDNN converts bf16 weights for its kernels) — so it is what a GPU holds for the same
step, before allocator fragmentation and kernel workspaces. The growth from 2 to 4 layers is the
per-layer cost, which scales the count to the published depth (the vision tower's 2 → 32 blocks are
scaled the same way in `vision_per_block_gb`, from a 4-block run). Weights are counted exactly from
the published configuration.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GB = 1e9
DEPTH = {"3b": 36, "7b": 28}
VISION_DEPTH = 32
PROBES = {"base": (2, 2), "layers": (4, 2), "blocks": (2, 4)}  # (language layers, vision blocks)


class SavedForBackward:
    """Bytes autograd holds for the backward pass (activations, logits; not parameters), live and at
    their peak, counted per storage: the part of training memory that grows with depth and batch,
    measured the same way on any device."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.params or tensor.device.type == "meta":
            return tensor
        if not self.refs.get(key):
            self.live += tensor.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(self, key, tensor)

    def release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= nbytes

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, owner: SavedForBackward, key: int, tensor):
        self.owner, self.key, self.tensor, self.nbytes = owner, key, tensor, tensor.untyped_storage().nbytes()

    def __del__(self):
        self.owner.release(self.key, self.nbytes)


def measure_one(size: str, layers: int, blocks: int, batch_size: int) -> dict:
    """In this process: build the twin, load it as a stage does (bf16, LoRA r 8 on q/v), run one NPO
    forward and backward on `batch_size` image rows; the bytes saved for backward at their peak."""
    import torch

    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise
    from offside.models.loading import LoraSpec, ModelSpec, build_or_load
    from offside.models.twin import qwen_twin
    from offside.stages import training_rows
    from offside.unlearn import get_method

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = materialise(load_benchmark("tests/golden/data")["forget"])
        texts = [r[c] for r in rows for c in ("question", "answer")]
        twin = qwen_twin(f"{tmp}/twin", texts, size=size, layers=layers, vision_blocks=blocks)
        batch = training_rows(rows, ["image"])[:batch_size]
        model, processor = build_or_load(ModelSpec(str(twin), dtype="bf16", device="cpu", lora=LoraSpec(r=8, alpha=16)))
    inputs = processor.encode([r["question"] for r in batch], [r["image"] for r in batch], [r["answer"] for r in batch]).inputs
    method = get_method("npo")
    method.setup(model, torch.device("cpu"))
    saved = SavedForBackward(model)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss, _ = method.loss(model, {"forget": inputs})
    loss.backward()
    return {"params": sum(p.numel() for p in model.parameters()), "saved_gb": saved.peak / GB,
            "left_after_backward": saved.live, "tokens": int(inputs["attention_mask"].sum())}


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
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "LAYERS", "BLOCKS"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), int(args.one[2]), args.batch_size)))
        return 0
    figures = {}
    print(f"activations: GB saved for backward by one LoRA NPO step of {args.batch_size} image rows (bf16)")
    print(f"{'model':<6} {'params':>8} {'weights GB':>10} {'2+2':>8} {'per layer':>9} {'per block':>9} {'full depth':>10} "
          f"{'DS ZeRO-2 full FT':>17} {'DS ZeRO-3 full FT':>17}")
    for size in args.sizes:
        runs = {name: child(size, *probe, args.batch_size) for name, probe in PROBES.items()}
        assert all(run["left_after_backward"] == 0 for run in runs.values())  # the count balances
        per_layer = (runs["layers"]["saved_gb"] - runs["base"]["saved_gb"]) / 2
        per_block = (runs["blocks"]["saved_gb"] - runs["base"]["saved_gb"]) / 2
        full_step = runs["base"]["saved_gb"] + (DEPTH[size] - 2) * per_layer + (VISION_DEPTH - 2) * per_block
        total = published_params(size)
        weights = 2 * total / GB  # bf16
        ds = deepspeed_estimates(size)
        row = {"params_b": total / 1e9, "weights_gb": weights, "activations_per_layer_gb": per_layer,
               "vision_per_block_gb": per_block,
               "activations_full_depth_gb": full_step, "activations_2_layers_gb": runs["base"]["saved_gb"],
               "tokens_per_step": runs["base"]["tokens"], "batch_size": args.batch_size, **ds}
        figures[size] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(f"{size:<6} {total / 1e9:>7.2f}B {weights:>10.1f} {runs['base']['saved_gb']:>8.3f} {per_layer:>9.4f} {per_block:>9.4f} "
              f"{full_step:>10.1f} {ds['ds_zero2_full_ft_gb']:>17.1f} {ds['ds_zero3_full_ft_gb']:>17.1f}")
    print(json.dumps(figures))
    return 0


def child(size: str, layers: int, blocks: int, batch_size: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", size, str(layers), str(blocks), "--batch-size", str(batch_size)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{size} with {layers} layers, {blocks} vision blocks failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
