"""Weight-level attacks and white-box probes on the forget set, plus the membership-inference check.

- `relearning_curve`: fine-tune the model with the training engine on a small share of the forget
  items (one optimizer step per epoch, over micro-batches) and measure, after k steps, the recovery
  on the *other* forget items — how cheaply do rumours come back? The attacker trains what the
  model's owner trained: LoRA adapters when the model is a LoRA stage (removed afterwards, so no
  copy of the weights), every weight of a copy otherwise.
- `quantised_int8`: a copy of the model with int8 dynamic weight quantisation of every Linear layer,
  on the CPU whatever device the model is on (torch's dynamic int8 kernels are CPU-only).
- `quantised_4bit`: the model reloaded through transformers' `BitsAndBytesConfig(load_in_4bit=True)`
  — bitsandbytes NF4 or FP4 (blockwise, 64 weights per absmax scale), on the model's own device: the
  CPU backend here, CUDA on a GPU. transformers keeps `lm_head` in full precision, as it does for
  every user who loads a checkpoint in 4-bit (the setting of arXiv 2410.16454, where 4-bit brings
  forgotten knowledge back and int8 does not). Without bitsandbytes (`four_bit_backend` is None)
  the suite notes that 4-bit was skipped.
- `logit_lens`: rank of the forget value's first token, read out at every layer through the final
  norm and the LM head, after the answer sentence's opening words.
- `mia_auc`: loss-based membership inference, forget (trained on) vs test (never trained on) items:
  AUC of "lower loss ⇒ member"; 0.5 = indistinguishable.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import random
import tempfile
import warnings

import torch

from offside.data.schema import ANSWER_TEMPLATES
from offside.engine.finetune import FineTune
from offside.engine.losses import sequence_nll
from offside.engine.trainer import TrainSpec, train
from offside.errors import OffsideError
from offside.eval.attacks import run_attacks
from offside.eval.spec import FOUR_BIT_TYPES
from offside.models.loading import LoraSpec, apply_lora
from offside.models.processor import Processor

# Rows per micro-batch of the relearning attack: one optimizer step still covers every relearn row
# (gradient accumulation over equal-as-possible micro-batches), at a bounded activation memory.
RELEARN_MICRO_BATCH = 8


def relearning_curve(model, processor: Processor, forget_rows: list[dict], steps: list[int], lr: float,
                     share: float = 0.25, seed: int = 0, lora: LoraSpec | None = None) -> dict[int, float]:
    """Recovery rate (no prompt attack) on held-out forget rows after k relearning steps, k in
    `steps` (0 = before relearning). The relearn rows are the generation rows of `share` of the
    players; the held-out rows are every row of the other players."""
    players = sorted({r["player"] for r in forget_rows})
    chosen = set(random.Random(seed).sample(players, max(1, round(share * len(players)))))
    relearn_rows = [r for r in forget_rows if r["player"] in chosen and r["form"] == "gen"]
    held_out = [r for r in forget_rows if r["player"] not in chosen] or forget_rows
    curve = {0: _recovery(model, processor, held_out)} if 0 in steps else {}
    wanted = sorted(k for k in steps if k > 0)
    if not wanted or not relearn_rows:
        return curve
    micro = math.ceil(len(relearn_rows) / math.ceil(len(relearn_rows) / RELEARN_MICRO_BATCH))
    spec = TrainSpec(epochs=wanted[-1], lr=lr, batch_size=micro, grad_accum=math.ceil(len(relearn_rows) / micro),
                     warmup_ratio=0.0, schedule="constant", seed=seed, max_grad_norm=1.0)

    def measure(epoch: int, trained, _logs) -> dict[str, float]:
        if epoch in wanted:
            curve[epoch] = _recovery(trained, processor, held_out)
        return {}

    student = apply_lora(model, lora, seed) if lora else _trainable_copy(model)
    try:
        train(student, processor, FineTune(), {"train": relearn_rows}, spec, callbacks=[measure], progress=False)
    finally:
        if lora:
            student.unload()  # the adapters out, the evaluated weights untouched
    return dict(sorted(curve.items()))


def _trainable_copy(model):
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _recovery(model, processor: Processor, rows: list[dict]) -> float:
    records = run_attacks(model, processor, rows, names=["none"])
    return sum(r["rumour_recovered"] for r in records) / max(1, len(records))


def quantised_int8(model):
    """torch's dynamic int8 quantisation (`quantize_dynamic`: int8 weights per Linear layer, activations
    quantised on the fly) of an fp32 copy of the model made on the CPU, where its kernels are. So a model
    on a GPU is attacked exactly as one on the CPU, and its GPU memory is untouched. The cost: host
    memory of 4 bytes per parameter while the copy is quantised (3B: ≈ 15 GB, 7B: ≈ 33 GB), about 1 per
    Linear weight afterwards, and the attack's generation runs on the CPU. A LoRA model's copy is merged
    first: the attack quantises the weights the model answers with (and PEFT's layers cannot run on
    quantised adapters)."""
    copied = cpu_fp32_copy(model)
    if hasattr(copied, "merge_and_unload"):
        copied = copied.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copied, {torch.nn.Linear}, dtype=torch.qint8)


def cpu_fp32_copy(model):
    """A deep copy of the model whose parameters and buffers are fp32 copies on the CPU, made tensor by
    tensor (no copy on the model's own device); the model is left as it was."""
    memo: dict = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        copied = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
        memo[id(tensor)] = torch.nn.Parameter(copied, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else copied
    return copy.deepcopy(model, memo)




def four_bit_backend() -> str | None:
    return "bitsandbytes" if importlib.util.find_spec("bitsandbytes") is not None else None


def quantised_4bit(model, quant_type: str = "nf4"):
    """A 4-bit copy of the model (module docstring): saved to a temporary directory and loaded back
    with transformers' bitsandbytes config, so the quantisation is the library's own."""
    if quant_type not in FOUR_BIT_TYPES:
        raise OffsideError(f"4-bit quantisation: unknown type {quant_type!r} (valid: {', '.join(FOUR_BIT_TYPES)})")
    if four_bit_backend() is None:
        raise OffsideError("4-bit quantisation needs bitsandbytes (pip install 'bitsandbytes>=0.45')")
    from transformers import BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    source = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    parameter = next(source.parameters())
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=parameter.dtype)
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source.save_pretrained(tmp)
            quantised = type(source).from_pretrained(tmp, quantization_config=config, dtype=parameter.dtype,
                                                     device_map={"": parameter.device})
    finally:
        hf_logging.enable_progress_bar()
    for module in quantised.modules():
        # bitsandbytes 0.50's CPU repacking for AVX512-BF16 machines breaks on widths that are not a
        # multiple of its 64-weight block (the tiny model's vision tower) and would make the numbers
        # depend on the CPU kind; the generic dequantise-and-matmul path is the same everywhere.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return quantised.eval()


@torch.no_grad()
def logit_lens(model, processor: Processor, rows: list[dict]) -> dict[int, float]:
    """Mean rank (0 = top) of the forget value's first token at each layer (1..n), over generation
    rows whose answer sentence has a known opening."""
    cases = [(r, ANSWER_TEMPLATES[r["field"]].split("{v}")[0]) for r in rows
             if r["form"] == "gen" and r.get("value") and r.get("field") in ANSWER_TEMPLATES]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    norm, head = inner.model.language_model.norm, inner.lm_head
    device = next(model.parameters()).device
    ranks: dict[int, list[int]] = {}
    for row, opening in cases:
        target = processor.tokenizer(" " + row["value"], add_special_tokens=False)["input_ids"][0]
        encoded = processor.encode([row["question"]], [row.get("image")], answers=[opening.rstrip()])
        inputs = {k: v.to(device) for k, v in encoded.inputs.items() if k != "labels"}
        end = int(inputs["attention_mask"][0].sum()) - 2  # last opening token (before <|im_end|>)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        for layer in range(1, len(hidden)):
            logits = head(norm(hidden[layer][0, end])) if layer < len(hidden) - 1 else head(hidden[layer][0, end])
            ranks.setdefault(layer, []).append(int((logits > logits[target]).sum()))
    return {layer: sum(v) / len(v) for layer, v in ranks.items()}


@torch.no_grad()
def answer_losses(model, processor: Processor, rows: list[dict], batch_size: int = 32) -> list[float]:
    device = next(model.parameters()).device
    losses: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        encoded = processor.encode([r["question"] for r in chunk], [r.get("image") for r in chunk],
                                   answers=[r["answer"] for r in chunk])
        inputs = {k: v.to(device) for k, v in encoded.inputs.items()}
        losses += sequence_nll(model, inputs).tolist()
    return losses


def mia_auc(model, processor: Processor, members: list[dict], non_members: list[dict]) -> float:
    """P(loss of a random member < loss of a random non-member), ties counting half."""
    was_training = model.training
    model.eval()
    inside = answer_losses(model, processor, members)
    outside = answer_losses(model, processor, non_members)
    model.train(was_training)
    return auc(outside, inside)


def auc(negatives: list[float], positives_low: list[float]) -> float:
    """Mann–Whitney AUC that a positive scores lower than a negative."""
    if not negatives or not positives_low:
        return float("nan")
    wins = sum((p < n) + 0.5 * (p == n) for p in positives_low for n in negatives)
    return wins / (len(negatives) * len(positives_low))
