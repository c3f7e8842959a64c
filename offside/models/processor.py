"""Turns (question, image, answer) rows into Qwen2.5-VL model inputs.

`AutoProcessor` for Qwen2.5-VL needs torchvision (it insists on a video processor), so the processor
is assembled from the tokenizer and `Qwen2VLImageProcessorPil`. The chat layout is Qwen's
(`<|im_start|>user ... <|im_end|>`), without the default system turn, for the tiny model and real
checkpoints alike. `mm_token_type_ids` is always returned: without it transformers silently falls
back to 1-D positions instead of Qwen2.5-VL's 3-D mRoPE.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PATCH_MULTIPLE = 28  # patch 14 × spatial merge 2


@dataclass(frozen=True)
class Chat:
    """A user turn with extras (used by prompt attacks): a system turn, earlier text-only
    (question, answer) turns, and a prefix the assistant's answer is forced to start with."""

    question: str
    system: str | None = None
    shots: tuple[tuple[str, str], ...] = ()
    prefix: str = ""


@dataclass
class Encoded:
    """A model-ready batch plus where each row's answer starts (for scoring)."""

    inputs: dict[str, torch.Tensor]
    answer_start: list[int]  # index of the first answer token in each (padded) row


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random view of the same photo (half the time the photo itself): crop-and-zoom, shift, mirror.
    Used in training only, so the model learns the player and the kit rather than the exact pixels;
    colours are left alone, since they carry the player's identity."""
    if rng.random() < 0.5:
        return image
    width, height = image.size
    scale = rng.uniform(0.85, 1.0)
    crop_w, crop_h = int(width * scale), int(height * scale)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    view = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


class Processor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_size: int, merge_size: int = 2):
        if image_size % PATCH_MULTIPLE:
            raise ValueError(f"image_size must be a multiple of {PATCH_MULTIPLE}, got {image_size}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_processor = Qwen2VLImageProcessorPil(
            do_resize=False, merge_size=merge_size, patch_size=14, temporal_patch_size=2
        )
        self.image_tokens = (image_size // 14) ** 2 // merge_size**2
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.end_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

    def prompt(self, question: str | Chat, has_image: bool) -> str:
        vision = VISION_START + IMAGE_PAD * self.image_tokens + VISION_END if has_image else ""
        if isinstance(question, str):
            return f"{IM_START}user\n{vision}{question}{IM_END}\n{IM_START}assistant\n"
        turns = [f"{IM_START}system\n{question.system}{IM_END}\n"] if question.system else []
        turns += [f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n" for q, a in question.shots]
        return "".join(turns) + f"{IM_START}user\n{vision}{question.question}{IM_END}\n{IM_START}assistant\n{question.prefix}"

    def pixels(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        size = (self.image_size, self.image_size)
        resized = [im.convert("RGB").resize(size, Image.Resampling.BICUBIC) for im in images]
        out = self.image_processor(resized, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def encode(
        self,
        questions: list[str | Chat],
        images: list[Image.Image | None],
        answers: list[str] | None = None,
        left_pad: bool = False,
    ) -> Encoded:
        """Tokenise a batch. With `answers`, each row is prompt + answer + <|im_end|> and `labels` mask
        the prompt; without, rows end at the assistant header (for generation)."""
        prompts = [self.prompt(q, im is not None) for q, im in zip(questions, images)]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if answers is None:
            answer_ids = [[] for _ in prompts]
        else:
            answer_ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"] + [self.end_id] for a in answers]
        rows = [p + a for p, a in zip(prompt_ids, answer_ids)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        answer_start = []
        for i, (row, p) in enumerate(zip(rows, prompt_ids)):
            offset = width - len(row) if left_pad else 0
            input_ids[i, offset : offset + len(row)] = torch.tensor(row)
            attention[i, offset : offset + len(row)] = 1
            labels[i, offset + len(p) : offset + len(row)] = torch.tensor(row[len(p) :], dtype=torch.long)
            answer_start.append(offset + len(p))
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "mm_token_type_ids": (input_ids == self.image_pad_id).int(),
        }
        if answers is not None:
            inputs["labels"] = labels
        present = [im for im in images if im is not None]
        if present:
            inputs.update(self.pixels(present))
        return Encoded(inputs, answer_start)

    def decode(self, token_ids: torch.Tensor) -> str:
        ids = token_ids.tolist()
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
