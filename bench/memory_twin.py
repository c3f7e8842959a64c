"""Memory of Qwen2.5-VL-3B/7B training measured on their CPU twins at real width, beside DeepSpeed's own
ZeRO estimators — the figures behind cluster/README.md's sizing table.

    python bench/memory_twin.py [--sizes 3b 7b] [--batch-size 4] [--load-layers 4] [--skip-transformers-load]

1. Activations. For each size, a twin with 2 and with 4 language layers (`offside.models.twin`, bf16,
   2 vision blocks) runs one LoRA NPO forward and backward (r 8 on q/v, images 252×252) in a fresh
   process, counting the bytes autograd saves for backward (activations and answer-position logits;
   not the weights) at their peak; with `train.gradient_checkpointing` on and off. That count is
   device-independent — the CPU process's resident memory is not a GPU's (oneDNN converts bf16
   weights for its kernels) — so it is what a GPU holds for the same step, before allocator
   fragmentation and kernel workspaces. The growth from 2 to 4 layers is the per-layer cost, which
   scales the count to the published depth (the vision tower's 2 → 32 blocks are scaled the same way
   in `vision_per_block_gb`, from a 4-block run). With checkpointing, what autograd keeps is each
   layer's input; the backward pass then recomputes one layer at a time, whose activations (the
   per-layer figure without checkpointing) come on top while it runs: `activations_full_depth_ckpt_gb`
   includes that one layer.
2. ZeRO-3 loading. A twin of `--load-layers` language layers and as many vision blocks is loaded for
   ZeRO-3 training by 2 gloo ranks (`build_or_load(..., train=TrainSpec(zero_stage=3))`); each rank
   records the peak of its resident memory (VmHWM, reset just before the load) above what it held
   before, against the full model's bytes (bf16): `zero3_load_ratio`, the worst rank's. Unless
   `--skip-transformers-load`, the same for transformers' own ZeRO-3 loading (`HfDeepSpeedConfig`
   alive during `from_pretrained`), for comparison.
Weights are counted exactly from the published configuration. DeepSpeed's estimators
(`estimate_zero{2,3}_model_states_mem_needs_all_cold`) count model states of *full* fine-tuning (16
bytes per trained parameter): with LoRA those states are a few MB, which is the point of the
comparison. Prints tables, then one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

GB = 1e9
DEPTH = {"3b": 36, "7b": 28}
VISION_DEPTH = 32
PROBES = {"base": (2, 2), "layers": (4, 2), "blocks": (2, 4)}  # (language layers, vision blocks)
CHECKPOINTED_PROBES = {"base": (2, 2), "layers": (4, 2)}
LOAD_RANKS = 2


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


def _texts_and_rows():
    from offside.data.loader import load_benchmark
    from offside.data.rows import materialise

    rows = materialise(load_benchmark("tests/golden/data")["forget"])
    return [r[c] for r in rows for c in ("question", "answer")], rows


def measure_one(size: str, layers: int, blocks: int, batch_size: int, checkpointing: bool) -> dict:
    """In this process: build the twin, load it as a stage does (bf16, LoRA r 8 on q/v), run one NPO
    forward and backward on `batch_size` image rows; the bytes saved for backward at their peak."""
    import torch

    from offside.engine.trainer import checkpoint_activations
    from offside.models.loading import LoraSpec, ModelSpec, build_or_load
    from offside.models.twin import qwen_twin
    from offside.stages import training_rows
    from offside.unlearn import get_method

    torch.set_num_threads(2)
    texts, rows = _texts_and_rows()
    with tempfile.TemporaryDirectory() as tmp:
        twin = qwen_twin(f"{tmp}/twin", texts, size=size, layers=layers, vision_blocks=blocks)
        batch = training_rows(rows, ["image"])[:batch_size]
        model, processor = build_or_load(ModelSpec(str(twin), dtype="bf16", device="cpu", lora=LoraSpec(r=8, alpha=16)))
    inputs = processor.encode([r["question"] for r in batch], [r["image"] for r in batch], [r["answer"] for r in batch]).inputs
    method = get_method("npo")
    method.setup(model, torch.device("cpu"))
    model.train()
    if checkpointing:
        checkpoint_activations(model)
    saved = SavedForBackward(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss, _ = method.loss(model, {"forget": inputs})
    loss.backward()
    return {"params": sum(p.numel() for p in model.parameters()), "saved_gb": saved.peak / GB,
            "left_after_backward": saved.live, "tokens": int(inputs["attention_mask"].sum())}


def make_twin(size: str, layers: int, out: str) -> None:
    from offside.models.twin import qwen_twin

    qwen_twin(out, _texts_and_rows()[0], size=size, layers=layers, vision_blocks=layers)


def _memory() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _load_rank(rank: int, world: int, port: int, twin: str, mode: str, out: str) -> None:
    """One rank: everything a load needs imported and DeepSpeed's partitioning warmed up on a small
    module, the peak reset, then the twin loaded for ZeRO-3; its memory before, at peak and after."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.integrations import HfDeepSpeedConfig

    from offside.engine.trainer import TrainSpec, deepspeed_config, ensure_distributed
    from offside.models.loading import ModelSpec, build_or_load

    spec = TrainSpec(zero_stage=3, batch_size=1)
    config = deepspeed_config(spec, torch.bfloat16)
    ensure_distributed()
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
        torch.nn.Linear(64, 64)  # warm-up: DeepSpeed's lazy imports and buffers are not the model's
    dist.barrier()
    before = _memory()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if mode == "offside":
        model, _ = build_or_load(ModelSpec(twin, dtype="bf16"), train=spec)
    else:
        keep = HfDeepSpeedConfig(config)  # noqa: F841  (transformers reads it while it lives)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(twin, dtype=torch.bfloat16)
    after = _memory()
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps({"before": before, "peak": after["VmHWM"], "after": after["VmRSS"],
                                                            "partition_bytes": held}))
    dist.barrier()
    dist.destroy_process_group()


def zero3_load(size: str, layers: int, modes: list[str]) -> dict:
    """Per mode: each rank's peak memory while loading above its level before, the full model's bytes
    and the worst rank's ratio."""
    import torch.multiprocessing as mp

    from offside.models.zero3 import _header

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        twin = f"{tmp}/twin"
        run_child("--make-twin", size, str(layers), twin)
        header, _ = _header(Path(twin, "model.safetensors"))
        full = sum(end - begin for begin, end in (entry["data_offsets"] for entry in header.values()))  # bf16 bytes
        for mode in modes:
            mp.spawn(_load_rank, args=(LOAD_RANKS, _free_port(), twin, mode, tmp), nprocs=LOAD_RANKS, join=True)
            ranks = [json.loads(Path(tmp, f"{mode}-{r}.json").read_text()) for r in range(LOAD_RANKS)]
            peaks = [r["peak"] - r["before"] for r in ranks]
            results[mode] = {"full_model_gb": full / GB, "peak_per_rank_gb": [p / GB for p in peaks],
                             "partition_per_rank_gb": [r["partition_bytes"] / GB for r in ranks],
                             "ratio": max(peaks) / full}
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def activations(size: str, batch_size: int) -> dict:
    runs = {name: child(size, *probe, batch_size, False) for name, probe in PROBES.items()}
    ckpt = {name: child(size, *probe, batch_size, True) for name, probe in CHECKPOINTED_PROBES.items()}
    assert all(run["left_after_backward"] == 0 for run in [*runs.values(), *ckpt.values()])  # the count balances
    per_layer = (runs["layers"]["saved_gb"] - runs["base"]["saved_gb"]) / 2
    per_block = (runs["blocks"]["saved_gb"] - runs["base"]["saved_gb"]) / 2
    per_layer_ckpt = (ckpt["layers"]["saved_gb"] - ckpt["base"]["saved_gb"]) / 2
    vision = (VISION_DEPTH - 2) * per_block
    full = runs["base"]["saved_gb"] + (DEPTH[size] - 2) * per_layer + vision
    full_ckpt = ckpt["base"]["saved_gb"] + (DEPTH[size] - 2) * per_layer_ckpt + vision + per_layer  # + one layer recomputed
    return {"activations_per_layer_gb": per_layer, "vision_per_block_gb": per_block,
            "activations_full_depth_gb": full, "activations_2_layers_gb": runs["base"]["saved_gb"],
            "activations_per_layer_ckpt_gb": per_layer_ckpt, "activations_full_depth_ckpt_gb": full_ckpt,
            "checkpointing_saving": full / full_ckpt, "tokens_per_step": runs["base"]["tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["3b", "7b"], choices=list(DEPTH))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--load-layers", type=int, default=4, help="language layers (and vision blocks) of the ZeRO-3 loading twin")
    parser.add_argument("--skip-transformers-load", action="store_true", help="measure offside's ZeRO-3 loading only")
    parser.add_argument("--skip-activations", action="store_true", help="measure ZeRO-3 loading only")
    parser.add_argument("--one", nargs=4, metavar=("SIZE", "LAYERS", "BLOCKS", "CKPT"), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--make-twin", nargs=3, metavar=("SIZE", "LAYERS", "OUT"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), int(args.one[2]), args.batch_size, args.one[3] == "1")))
        return 0
    if args.make_twin:
        make_twin(args.make_twin[0], int(args.make_twin[1]), args.make_twin[2])
        return 0
    modes = ["offside"] + ([] if args.skip_transformers_load else ["transformers"])
    figures = {}
    for size in args.sizes:
        total = published_params(size)
        row = {"params_b": total / 1e9, "weights_gb": 2 * total / GB, "batch_size": args.batch_size, **deepspeed_estimates(size)}
        if not args.skip_activations:
            row |= activations(size, args.batch_size)
        load = zero3_load(size, args.load_layers, modes)
        row |= {"zero3_load_layers": args.load_layers, "zero3_load_full_gb": load["offside"]["full_model_gb"],
                "zero3_load_peak_per_rank_gb": load["offside"]["peak_per_rank_gb"],
                "zero3_load_ratio": load["offside"]["ratio"]}
        if "transformers" in load:
            row |= {"hf_zero3_load_peak_per_rank_gb": load["transformers"]["peak_per_rank_gb"],
                    "hf_zero3_load_ratio": load["transformers"]["ratio"]}
        figures[size] = _rounded(row)
    print_tables(figures, args.batch_size)
    print(json.dumps(figures))
    return 0


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def print_tables(figures: dict, batch_size: int) -> None:
    if any("activations_per_layer_gb" in f for f in figures.values()):
        print(f"activations: GB saved for backward by one LoRA NPO step of {batch_size} image rows (bf16)")
        print(f"{'model':<6} {'params':>8} {'weights GB':>10} {'per layer':>9} {'per block':>9} {'full depth':>10} "
              f"{'ckpt/layer':>10} {'full ckpt':>9} {'DS ZeRO-2 full FT':>17} {'DS ZeRO-3 full FT':>17}")
        for size, f in figures.items():
            print(f"{size:<6} {f['params_b']:>7.2f}B {f['weights_gb']:>10.1f} {f['activations_per_layer_gb']:>9.4f} "
                  f"{f['vision_per_block_gb']:>9.4f} {f['activations_full_depth_gb']:>10.2f} {f['activations_per_layer_ckpt_gb']:>10.4f} "
                  f"{f['activations_full_depth_ckpt_gb']:>9.2f} {f['ds_zero2_full_ft_gb']:>17.1f} {f['ds_zero3_full_ft_gb']:>17.1f}")
    print(f"ZeRO-3 loading on {LOAD_RANKS} gloo ranks: peak resident memory per rank above its level before the load, GB")
    print(f"{'model':<6} {'twin layers':>11} {'full model':>10} {'offside per rank':>18} {'ratio':>6} {'transformers per rank':>22} {'ratio':>6}")
    for size, f in figures.items():
        hf = f.get("hf_zero3_load_peak_per_rank_gb")
        print(f"{size:<6} {f['zero3_load_layers']:>11} {f['zero3_load_full_gb']:>10.2f} "
              f"{' / '.join(f'{p:.2f}' for p in f['zero3_load_peak_per_rank_gb']):>18} {f['zero3_load_ratio']:>6.2f} "
              f"{' / '.join(f'{p:.2f}' for p in hf) if hf else 'n/a':>22} {f.get('hf_zero3_load_ratio', float('nan')):>6.2f}")


def run_child(*args: str) -> str:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def child(size: str, layers: int, blocks: int, batch_size: int, checkpointing: bool) -> dict:
    out = run_child("--one", size, str(layers), str(blocks), "1" if checkpointing else "0", "--batch-size", str(batch_size))
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
