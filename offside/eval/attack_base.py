"""What every attack module builds on: the attack registry, the context an attack may read, and the
question card that the cross-modal and typographic attacks draw. Attacks register with `@attack`
(prompt attacks in `attacks.py`, image-side attacks in `image_attacks.py`); `attacks.py` imports
both, so importing it fills the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

ATTACKS: dict[str, Callable] = {}
IMAGE_ATTACKS: set[str] = set()  # run on rows with an image only
BATCHED_ATTACKS: set[str] = set()  # fn(rows, context) -> rows
WHITE_BOX_ATTACKS: set[str] = set()  # need the model's gradients (not run by the HTTP endpoint)


@dataclass
class AttackContext:
    """What an attack may know beyond its row: the other facts of the row's image context (from the
    rows given to `run_attacks`) and answered example rows for in-context demonstrations."""

    facts: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (player, image_id) -> field -> value
    examples: list[dict] = field(default_factory=list)
    model: Any = None  # the attacked model and its processor, for white-box attacks
    processor: Any = None


def attack(name: str, image: bool = False, batched: bool = False, white_box: bool = False):
    def add(fn: Callable) -> Callable:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        ATTACKS[name] = fn
        for flag, kind in ((image, IMAGE_ATTACKS), (batched, BATCHED_ATTACKS), (white_box, WHITE_BOX_ATTACKS)):
            if flag:
                kind.add(name)
        return fn

    return add


def question_card(question: str, image: Image.Image | None, size: int = 224) -> Image.Image:
    """The question as large black text on white, under the photo when there is one."""
    font = ImageFont.load_default(size=14)
    card = Image.new("RGB", (size, size), "white")
    top = 0
    if image is not None:
        photo = image.convert("RGB").resize((size, size * 5 // 8))
        card.paste(photo, (0, 0))
        top = photo.height
    draw = ImageDraw.Draw(card)
    line, y = "", top + 4
    for word in question.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > size - 8 and line:
            draw.text((4, y), line, fill="black", font=font)
            line, y = word, y + 16
        else:
            line = trial
    draw.text((4, y), line, fill="black", font=font)
    return card
