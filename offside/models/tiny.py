"""The `tiny` model: the production class (Qwen2_5_VLForConditionalGeneration) with a small config and
a byte-level BPE tokenizer trained locally on the benchmark's own text (nothing is downloaded).

It is built from scratch, so it knows only what the vanilla fine-tune teaches it (and, with a kit drill,
what `pretrain_vision` teaches its vision tower first)."""

from __future__ import annotations

import math
from collections.abc import Iterable
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from offside.models.spec import TinySpec  # noqa: F401  (re-exported)
from offside.models.processor import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START

SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token="<|endoftext|>", bos_token=None
    )


def build_tiny(texts: Iterable[str], spec: TinySpec, seed: int = 0):
    """A freshly initialised tiny model and its tokenizer; `texts` train the tokenizer."""
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden // spec.heads
    quarter = head_dim // 2 // 4  # mrope_section must sum to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=spec.mlp,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
            bos_token_id=None,
            eos_token_id=ids(IM_END),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 4,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden,
            window_size=112,
            fullatt_block_indexes=list(range(spec.vision_depth)),
        ),
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids(IM_END)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer


def pretrain_vision(model, processor, photos: list, labels: list[tuple[int, ...]], classes: tuple[int, ...],
                    seed: int = 0, epochs: int = 10, lr: float = 3e-3, batch_size: int = 64) -> dict[str, float]:
    """Pre-trains the vision tower to tell each photo's labels (one linear head per label on the mean of
    its merged visual tokens; the heads are dropped after), then freezes it: the tiny model's stand-in
    for a pre-trained vision encoder (offside/data/kits.py). AdamW, cosine schedule, clipping 1.0, on
    the model's device and dtype. Returns the last epoch's loss and accuracy on the first label."""
    visual = model.model.visual
    device, dtype = next(visual.parameters()).device, next(visual.parameters()).dtype
    pixels = processor.pixels(photos)
    per_photo = pixels["pixel_values"].shape[0] // len(photos)
    patches = pixels["pixel_values"].view(len(photos), per_photo, -1).to(device, dtype)
    grids, targets = pixels["image_grid_thw"].to(device), torch.tensor(labels, device=device)
    with torch.random.fork_rng(devices=[]):  # the heads' initialisation leaves the caller's random state alone
        torch.manual_seed(seed)
        heads = torch.nn.Linear(model.config.vision_config.out_hidden_size, sum(classes)).to(device, dtype)
    visual.requires_grad_(True)
    params = [*visual.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(photos) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    visual.train()
    for _ in range(epochs):
        total, right = 0.0, 0
        for batch in torch.randperm(len(photos), generator=generator).split(batch_size):
            batch = batch.to(device)
            tokens = visual(patches[batch].flatten(0, 1), grid_thw=grids[batch]).pooler_output
            logits = heads(tokens.view(len(batch), -1, tokens.shape[-1]).mean(1)).float().split(classes, -1)
            loss = sum(torch.nn.functional.cross_entropy(part, targets[batch, i]) for i, part in enumerate(logits))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
            right += (logits[0].argmax(-1) == targets[batch, 0]).sum().item()
    visual.requires_grad_(False)
    return {"loss": total / len(photos), "accuracy": right / len(photos), "photos": len(photos), "epochs": epochs}
