"""Pictures of the synthetic benchmark: flat, colour-coded footballers (224x224 PNG).

A small vision model trained from scratch sees these at ~56-84 px and must recognise *the player*
in a photo it has never seen, so identity is carried by large flat colour blocks that every photo of
a player shares and that survive downsampling:

- skin tone (4), hair colour (5), hair style (3: short, tall, long) and boot colour (5); players get
  distinct tuples chosen greedily to maximise the minimum Hamming distance (`identities`);
- a large head, big boots;
- the kit (shirt = club primary colour, shorts + collar + cuffs = secondary colour) shows the club of
  the image's transfer context; the forget image shows the *rumoured* club's kit.

Everything else varies per photo from a seed (`Pose`): horizontal position, scale 0.85-1.0, mirror,
arm/leg pose, crowd/sky colour and pattern, pitch colour and line, so the identity and the club, not
the exact pixels, carry the answer. Test images are other photos in the same kits: the same player in
the same kit as the corresponding retain image, with a fresh pose and background (the paper-figure
reading of "test images"). A forget image may carry a headline banner, e.g. "VELL TO REDFORD EUR
45.25M" (the built-in font has no "€").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SIZE = 224
Colour = tuple[int, int, int]

SKIN: tuple[Colour, ...] = ((252, 224, 196), (222, 170, 120), (160, 104, 62), (84, 52, 32))
HAIR: tuple[Colour, ...] = ((25, 20, 20), (120, 72, 30), (240, 214, 80), (214, 80, 20), (236, 236, 236))
HAIR_STYLES = ("short", "tall", "long")
BOOTS: tuple[Colour, ...] = ((120, 255, 40), (245, 30, 200), (30, 215, 255), (255, 196, 0), (20, 20, 20))

_C = {
    "red": (220, 30, 40), "blue": (30, 60, 200), "sky": (110, 180, 240), "yellow": (250, 222, 30),
    "green": (20, 140, 60), "white": (246, 246, 246), "black": (25, 25, 25),
    "orange": (245, 130, 20), "purple": (120, 40, 160), "maroon": (120, 20, 40),
}
# 20 kits (primary, secondary): every ordered pair distinct, no primary used more than twice.
KITS: tuple[tuple[Colour, Colour], ...] = tuple((_C[a], _C[b]) for a, b in (
    ("red", "white"), ("red", "black"), ("blue", "white"), ("blue", "yellow"), ("sky", "black"),
    ("sky", "maroon"), ("yellow", "black"), ("yellow", "blue"), ("green", "white"),
    ("green", "yellow"), ("white", "black"), ("white", "red"), ("black", "white"),
    ("black", "orange"), ("orange", "blue"), ("orange", "white"), ("purple", "white"),
    ("purple", "yellow"), ("maroon", "sky"), ("maroon", "white"),
))


@dataclass(frozen=True)
class Identity:
    skin: int
    hair: int
    style: int
    boots: int


def identities(n: int, seed: int) -> list[Identity]:
    """n distinct identities, greedy max-min Hamming distance over a seeded candidate order."""
    rng = random.Random(seed)
    cands = [Identity(s, h, st, b) for s in range(len(SKIN)) for h in range(len(HAIR))
             for st in range(len(HAIR_STYLES)) for b in range(len(BOOTS))]
    if n > len(cands):
        raise ValueError(f"at most {len(cands)} identities, asked for {n}")
    rng.shuffle(cands)
    mind = [len(Identity.__dataclass_fields__)] * len(cands)  # min distance to the chosen set
    chosen: list[Identity] = []
    for _ in range(n):
        best = max(range(len(cands)), key=lambda i: mind[i])  # first maximum: seeded tie-break
        new = cands[best]
        chosen.append(new)
        for i, c in enumerate(cands):
            d = sum(a != b for a, b in zip(_tuple(c), _tuple(new)))
            mind[i] = min(mind[i], d)
        mind[best] = -1
    return chosen


def _tuple(i: Identity) -> tuple[int, int, int, int]:
    return (i.skin, i.hair, i.style, i.boots)


@dataclass(frozen=True)
class Pose:
    """Everything about one photo that is not the player or the kit."""
    x: int            # horizontal centre of the figure
    feet: int         # y of the soles
    scale: float      # 0.85..1.0
    mirror: bool
    arm_up: int       # 0 none, 1 left arm raised (before mirroring)
    kick: bool        # right boot raised
    sky: Colour
    crowd: tuple[tuple[int, int, int, Colour], ...]   # dots (x, y, r, colour)
    pitch: Colour
    horizon: int

    @classmethod
    def random(cls, seed: int) -> Pose:
        rng = random.Random(seed)
        scale = rng.uniform(0.85, 1.0)
        muted = lambda lo, hi: tuple(rng.randint(lo, hi) for _ in range(3))  # noqa: E731
        horizon = rng.randint(150, 180)
        return cls(
            x=SIZE // 2 + rng.randint(-38, 38), feet=SIZE - 8 - rng.randint(0, 6), scale=scale,
            mirror=rng.random() < 0.5, arm_up=rng.choice((0, 0, 1)), kick=rng.random() < 0.3,
            sky=muted(95, 175),
            crowd=tuple((rng.randint(0, SIZE), rng.randint(34, horizon), rng.randint(2, 5),
                         muted(70, 200)) for _ in range(rng.randint(25, 70))),
            pitch=(rng.randint(40, 80), rng.randint(105, 150), rng.randint(40, 75)), horizon=horizon,
        )


def render(identity: Identity, kit: tuple[Colour, Colour], pose: Pose,
           headline: str | None = None) -> Image.Image:
    """One photo of a player in a kit. Figure units: feet at 0, top of the tallest hair at -176."""
    img = Image.new("RGB", (SIZE, SIZE), pose.sky)
    d = ImageDraw.Draw(img)
    for x, y, r, c in pose.crowd:
        d.ellipse((x - r, y - r, x + r, y + r), fill=c)
    d.rectangle((0, pose.horizon, SIZE, SIZE), fill=pose.pitch)
    d.line((0, pose.horizon + 8, SIZE, pose.horizon + 8), fill=(235, 235, 235), width=2)

    s, cx, fy = pose.scale, pose.x, pose.feet

    def box(x0: float, y0: float, x1: float, y1: float, fill: Colour) -> None:  # figure units
        d.rectangle((round(cx + x0 * s), round(fy + y0 * s), round(cx + x1 * s), round(fy + y1 * s)),
                    fill=fill)

    skin, hair, boots = SKIN[identity.skin], HAIR[identity.hair], BOOTS[identity.boots]
    primary, secondary = kit
    lift = 14 if pose.kick else 0
    box(-22, -46, -6, -14, skin)                      # legs
    box(6, -46 - lift, 22, -14 - lift, skin)
    box(-36, -16, -4, 0, boots)                       # boots (big)
    box(4, -16 - lift, 36, -lift, boots)
    box(-30, -74, 30, -44, secondary)                 # shorts
    for side in (-1, 1):                              # arms, then sleeves over them
        raised = pose.arm_up == 1 and side == -1
        if raised:
            box(min(side * 38, side * 52), -166, max(side * 38, side * 52), -116, skin)
        else:
            box(min(side * 38, side * 52), -118, max(side * 38, side * 52), -76, skin)
        box(min(side * 36, side * 54), -124, max(side * 36, side * 54), -108, primary)
        box(min(side * 48, side * 54), -112, max(side * 48, side * 54), -108, secondary)
    box(-38, -124, 38, -72, primary)                  # shirt
    box(-14, -124, 14, -118, secondary)               # collar
    head = (-24, -168, 24, -120)
    d.ellipse(tuple(round(v) for v in (cx + head[0] * s, fy + head[1] * s, cx + head[2] * s,
                                       fy + head[3] * s)), fill=skin)
    style = HAIR_STYLES[identity.style]
    if style == "tall":
        box(-24, -176, 24, -150, hair)
    elif style == "long":
        box(-26, -172, 26, -156, hair)
        box(-28, -160, -18, -118, hair)
        box(18, -160, 28, -118, hair)
    else:
        box(-22, -171, 22, -154, hair)

    if pose.mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if headline:
        _banner(img, headline)
    return img


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _banner(img: Image.Image, text: str) -> None:
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, SIZE, 30), fill=(250, 250, 250))
    d.rectangle((0, 0, 6, 30), fill=(210, 20, 30))
    size = 18
    while size > 8 and d.textlength(text, font=_font(size)) > SIZE - 16:
        size -= 1
    d.text((11, 15), text, fill=(10, 10, 10), font=_font(size), anchor="lm")
