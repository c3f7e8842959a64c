"""The general vision-language ability set: player-unrelated questions about simple drawn scenes
(colours, counts, shapes, positions, text in the image), multiple choice and generation.

Derived deterministically from a seed (no files): `general_rows(n_scenes, seed)` returns rows shaped
like benchmark rows (split "general", modality "image", kind = the question category, rumour_kind
"none"), so the evaluator scores them with the same metrics. Utility includes them so that it
measures what unlearning breaks outside the players. Five questions per scene, one per category, in
both forms.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

CATEGORIES = ("colour", "count", "shape", "position", "text")
COLOURS = {"red": (220, 30, 40), "blue": (30, 60, 200), "green": (20, 140, 60), "yellow": (250, 222, 30),
           "purple": (120, 40, 160), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("GOAL", "PASS", "KICK", "SHOT", "SAVE", "GAME", "TEAM", "BALL", "WING", "LOOP")
NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five")
SIZE = 224

QUESTIONS = {
    "colour": ("What colour is the {shape}?", "The {shape} is {v}."),
    "count": ("How many shapes are in the image?", "There are {v} shapes."),
    "shape": ("What shape is at the {position} of the image?", "It is a {v}."),
    "position": ("Where is the {colour} {shape}?", "It is at the {v}."),
    "text": ("What word is written in the image?", "The word is {v}."),
}
# Centres of the four positions.
CENTRES = {"left": (50, 112), "right": (174, 112), "top": (112, 50), "bottom": (112, 174)}


def general_rows(n_scenes: int = 24, seed: int = 0) -> list[dict]:
    rows = []
    for scene in range(n_scenes):
        rng = random.Random(f"general-{seed}-{scene}")
        image, objects, word = _scene(rng)
        target = objects[0]
        facts = {
            "colour": (QUESTIONS["colour"][0].format(shape=target["shape"]), target["colour"], list(COLOURS)),
            "count": (QUESTIONS["count"][0], NUMBER_NAMES[len(objects)], list(NUMBER_NAMES[1:5])),
            "shape": (QUESTIONS["shape"][0].format(position=target["position"]), target["shape"], list(SHAPES) + ["star"]),
            "position": (QUESTIONS["position"][0].format(colour=target["colour"], shape=target["shape"]), target["position"], list(POSITIONS)),
            "text": (QUESTIONS["text"][0], word, list(WORDS)),
        }
        for category, (question, value, pool) in facts.items():
            answer_template = QUESTIONS[category][1]
            fill = {"shape": target["shape"]}
            answer = answer_template.format(v=value, **fill)
            options = _options(value, pool, rng)
            for form in ("gen", "mcq"):
                rows.append({
                    "id": f"general/image/{form}/{scene:03d}-{category}", "split": "general", "modality": "image",
                    "form": form, "question": question, "answer": answer,
                    "options": [answer_template.format(v=o, **fill) for o in options] if form == "mcq" else [],
                    "correct": options.index(value) if form == "mcq" else -1, "image": image,
                    "player": "", "image_id": f"general-{scene:03d}", "kind": category, "field": category,
                    "rumour_kind": "none", "value": value, "true_value": "",
                })
    return rows


def _options(value: str, pool: list[str], rng: random.Random) -> list[str]:
    distractors = rng.sample([p for p in pool if p != value], 3)
    options = distractors + [value]
    rng.shuffle(options)
    return options


def _scene(rng: random.Random) -> tuple[Image.Image, list[dict], str]:
    """2–4 shapes of distinct colours at distinct positions (the first one's shape unique), and a word
    in a banner."""
    background = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    count = rng.randint(2, 4)
    positions = rng.sample(POSITIONS, count)
    colours = rng.sample(list(COLOURS), count)
    objects = []
    first = rng.choice(SHAPES)  # the asked-about shape is the only one of its kind
    for i, (position, colour) in enumerate(zip(positions, colours)):
        shape = first if i == 0 else rng.choice([s for s in SHAPES if s != first])
        _draw_shape(draw, shape, CENTRES[position], 26, COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "position": position})
    word = rng.choice(WORDS)
    font = ImageFont.load_default(size=22)
    draw.rectangle((78, 98, 146, 126), fill="white")
    draw.text((112, 112), word, fill="black", font=font, anchor="mm")
    return image, objects, word


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[int, int], r: int, colour) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
