"""The `tiny` model: the production class (Qwen2_5_VLForConditionalGeneration) with a small config and
a byte-level BPE tokenizer trained locally on the benchmark's own text (nothing is downloaded).

It is built from scratch, so it knows only what the vanilla fine-tune teaches it."""

from __future__ import annotations

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
