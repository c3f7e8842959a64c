"""Random-weight twins of the published checkpoints: a model directory that a downloaded
Qwen2.5-VL-3B/7B-Instruct looks like to the code — its configuration at real width, module names,
special-token ids, vocabulary size, bf16 safetensors — at any depth. For tests and capacity checks
where nothing can be downloaded (`tests/test_real_scale.py`, `bench/gpu_check.py`).

The tokenizer is a byte-level BPE trained on the given texts, padded with never-produced filler tokens
so that Qwen's special tokens get their published ids (<|endoftext|> 151643 … <|video_pad|> 151656)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# Qwen2.5-VL's added tokens, in id order (tokenizer_config.json of the published checkpoints).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
FIRST_SPECIAL_ID = 151643
# The published language models (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct); the vision tower is shared.
SHAPES = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
VISION_BLOCKS, FULL_ATTENTION_BLOCKS = 32, (7, 15, 23, 31)


def qwen_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(small.to_str())["model"]
    vocab = dict(trained["vocab"]) | {f"<filler_{i}>": i for i in range(len(trained["vocab"]), FIRST_SPECIAL_ID)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(QWEN_SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def twin_config(size: str = "3b", layers: int | None = None, vision_blocks: int | None = None) -> Qwen2_5_VLConfig:
    """The published configuration of `size`, with the depth cut to `layers` / `vision_blocks` if given."""
    text = dict(SHAPES[size])
    text["num_hidden_layers"] = layers or text["num_hidden_layers"]
    depth = vision_blocks or VISION_BLOCKS
    return Qwen2_5_VLConfig(
        text_config=text | dict(max_position_embeddings=128000, bos_token_id=151643, eos_token_id=151645,
                                pad_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                      "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[b for b in FULL_ATTENTION_BLOCKS if b < depth] or [depth - 1]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def qwen_twin(out: str | Path, texts: list[str], size: str = "3b", layers: int | None = None,
              vision_blocks: int | None = None, seed: int = 0) -> Path:
    """Writes the twin to `out` (built in bf16: a full-depth 7B needs ≈ 17 GB of host memory) and returns it."""
    out = Path(out)
    tokenizer = qwen_tokenizer(texts)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(twin_config(size, layers, vision_blocks),
                                                            dtype=torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 151645, 151643
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
