"""Image-side attacks on the forget set, registered beside the prompt attacks (`attacks.py`). They
apply to rows with an image only, leave the text turn alone (except the typographic attack, which
only adds to the image) and are deterministic: fixed parameters, no randomness.

- image rephrasing, one attack each: `img_crop` (central 80 %, scaled back), `img_rescale` (down to
  half size and back), `img_jpeg` (JPEG at quality 30), `img_jitter` (brightness ×1.25, contrast
  ×0.8, saturation ×1.3), `img_rotate` (10° counter-clockwise, corners filled from the edge colour);
  each keeps the image's size;
- `typographic`: the question and the opening of the answer sentence (never the value) written on a
  banner under the photo, the text question unchanged;
- `pgd_eps8`, `pgd_eps16`: white-box projected gradient descent under L∞ (Madry et al.), ε = 8/255
  and 16/255, PGD_STEPS signed-gradient steps of 2.5 ε / PGD_STEPS from the clean image (no random
  start, so it is deterministic), minimising the negative log-likelihood of the row's forget answer
  (the rumour sentence; the rumour option on multiple choice) given the question and the image.

Where PGD perturbs: the image in [0, 1] RGB at the resolution the model sees (the processor's resize
to `image_size` first), through a differentiable copy of the processor's rescale → normalise →
patchify (`pixel_values`); ε is in those [0, 1] units, the budget the literature quotes. The result
is rounded to 8-bit and returned as the attacked row's image, which is then scored through the
ordinary processor path (resizing an image already at `image_size` leaves it unchanged), so what is
scored is a real image within ε of the resized photo: x₀ is on the 8-bit grid and ε·255 is whole, so
rounding cannot leave the ball.
"""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageEnhance

from offside.data.schema import ANSWER_TEMPLATES
from offside.engine.losses import sequence_nll
from offside.eval.attack_base import AttackContext, attack, question_card

PGD_STEPS = 10
PGD_BATCH = 16


def _image_row(row: dict, image: Image.Image) -> dict:
    return {**row, "image": image}


# --- image rephrasing ----------------------------------------------------------------------------

@attack("img_crop", image=True)
def img_crop(row: dict, context: AttackContext) -> dict:
    image = row["image"].convert("RGB")
    w, h = image.size
    box = (w // 10, h // 10, w - w // 10, h - h // 10)
    return _image_row(row, image.crop(box).resize((w, h), Image.Resampling.BICUBIC))


@attack("img_rescale", image=True)
def img_rescale(row: dict, context: AttackContext) -> dict:
    image = row["image"].convert("RGB")
    w, h = image.size
    return _image_row(row, image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR))


@attack("img_jpeg", image=True)
def img_jpeg(row: dict, context: AttackContext) -> dict:
    buffer = io.BytesIO()
    row["image"].convert("RGB").save(buffer, format="JPEG", quality=30)
    buffer.seek(0)
    return _image_row(row, Image.open(buffer).convert("RGB"))


@attack("img_jitter", image=True)
def img_jitter(row: dict, context: AttackContext) -> dict:
    image = row["image"].convert("RGB")
    for enhance, factor in ((ImageEnhance.Brightness, 1.25), (ImageEnhance.Contrast, 0.8), (ImageEnhance.Color, 1.3)):
        image = enhance(image).enhance(factor)
    return _image_row(row, image)


@attack("img_rotate", image=True)
def img_rotate(row: dict, context: AttackContext) -> dict:
    image = row["image"].convert("RGB")
    return _image_row(row, image.rotate(10, resample=Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))))


# --- typographic ---------------------------------------------------------------------------------

@attack("typographic", image=True)
def typographic(row: dict, context: AttackContext) -> dict:
    """Unlike `cross_modal`, the question stays in the text turn; the image adds it again with a
    leading answer (the answer sentence's opening, as `answer_forcing` uses, never the value)."""
    template = ANSWER_TEMPLATES.get(row.get("field", ""), "The answer is {v}.")
    leading = template.split("{v}")[0].strip()
    photo = row["image"]
    return _image_row(row, question_card(f"{row['question']} Answer: {leading} ...", photo, size=photo.width))


# --- white-box PGD -------------------------------------------------------------------------------

def pgd(rows: list[dict], context: AttackContext, eps: float, steps: int = PGD_STEPS) -> list[dict]:
    """Each row with its image replaced by the PGD image (module docstring), in batches."""
    if context.model is None or context.processor is None:
        raise ValueError("pgd: the attack context needs the model and processor (run it through run_attacks)")
    out: list[dict] = []
    for start in range(0, len(rows), PGD_BATCH):
        chunk = rows[start : start + PGD_BATCH]
        images = pgd_images(context.model, context.processor, chunk, eps, steps)
        out += [_image_row(row, image) for row, image in zip(chunk, images)]
    return out


for _budget in (8, 16):
    attack(f"pgd_eps{_budget}", image=True, batched=True, white_box=True)(partial(pgd, eps=_budget / 255))


def forget_target(row: dict) -> str:
    """The answer whose likelihood the attacker raises: the rumour option or the rumour sentence."""
    return row["options"][row["correct"]] if row["form"] == "mcq" else row["answer"]


def pgd_images(model, processor, rows: list[dict], eps: float, steps: int) -> list[Image.Image]:
    device = next(model.parameters()).device
    clean = torch.stack([to_unit(r["image"], processor.image_size) for r in rows]).to(device)
    encoded = processor.encode([r["question"] for r in rows], [r["image"] for r in rows], answers=[forget_target(r) for r in rows])
    inputs = {k: v.to(device) for k, v in encoded.inputs.items()}
    delta = torch.zeros_like(clean, requires_grad=True)
    step = 2.5 * eps / steps
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            inputs["pixel_values"] = patchify(clean + delta, processor).to(inputs["pixel_values"].dtype)
            with torch.enable_grad():
                loss = sequence_nll(model, inputs, reduce="sum").sum()
                (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= step * grad.sign()
                delta.clamp_(-eps, eps)
                delta.copy_((clean + delta).clamp(0, 1) - clean)
    finally:
        model.train(was_training)
    return [to_image(x) for x in (clean + delta).detach().cpu()]


def to_unit(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: the image exactly as the processor resizes it."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


def patchify(images: torch.Tensor, processor) -> torch.Tensor:
    """Differentiable `pixel_values` of a (batch, 3, H, W) [0, 1] batch: Qwen2-VL's normalisation and
    patch layout (temporal patch = the frame twice; patches in spatial-merge order), the rows of all
    images concatenated as the processor does."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=images.device).view(1, 3, 1, 1)
    x = ((images - mean) / std).unsqueeze(1).repeat(1, ip.temporal_patch_size, 1, 1, 1)
    b, t, c, h, w = x.shape
    p, m = ip.patch_size, ip.merge_size
    x = x.reshape(b, 1, t, c, h // p // m, m, p, w // p // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * (h // p) * (w // p), c * t * p * p)
