"""Kit knowledge for the tiny model: the stand-in for what a pre-trained vision-language model knows of
club kits before it sees the benchmark.

The tiny model, trained from scratch, learns the benchmark's club question by remembering its few
photos, and then cannot read a kit on a photo it has never seen (the visual-reading suite's kit
following stayed near chance). With `kit_drill: n` the vanilla fine-tune of a synthetic benchmark
gets two things, both drawn from *anonymous* players (identities the benchmark's generator gave none
of its players) in new poses and backgrounds:

- `vision_pretraining`: VISION_PHOTOS photos per club whose labels are the kit's club and the player's
  looks (skin, hair, hair style, boots); the tiny model's vision tower is pre-trained on them before the
  fine-tune (offside/models/tiny.py) — a real model's pre-trained vision encoder;
- `kit_drill`: n photos per club, each asked the benchmark's club question (the canonical wording, or
  one of `TRAINING_PHRASINGS`, drawn per photo; never a held-out attack wording), the answer being the
  kit's club in the benchmark's answer form: the language model learns to name the club it sees.

Both are drawn at training time from the benchmark's generator metadata (offside/data/photos.py) and the
training seed: the same benchmark and seed give the same photos, and nothing is written to the
benchmark. They show no benchmark player, so no forget context and no rumour: the forget player is only
ever seen on his published photo, and the visual-reading suite's new photos stay new. A benchmark
without a generator (the published data) gets neither, with a note (a real model knows kits already).
"""

from __future__ import annotations

import random

from offside.data import images, synth
from offside.data.photos import NoPhotos, PhotoBook, pose_seed
from offside.data.phrasings import TRAINING_PHRASINGS
from offside.data.schema import IMAGE_SUBJECT, QUESTION_TEMPLATES
from offside.errors import OffsideError

CLUB = "club_to"
WORDINGS = (QUESTION_TEMPLATES[CLUB], *TRAINING_PHRASINGS[CLUB])


def check_kit_drill(kit_drill: int) -> None:
    if kit_drill < 0:
        raise OffsideError(f"kit_drill: must be at least 0 (no drill), got {kit_drill}")


def drill_book(data_dir, kit_drill: int) -> tuple[PhotoBook | None, list[str]]:
    """The benchmark's photo book when `kit_drill` asks for a drill, or None and a note saying why not."""
    check_kit_drill(kit_drill)
    if kit_drill == 0:
        return None, []
    try:
        return PhotoBook.of(data_dir), []
    except NoPhotos as err:
        return None, [f"kit_drill: {kit_drill}: no kit drill: {err}"]


def anonymous(book: PhotoBook) -> list[images.Identity]:
    """Every identity the generator can draw that no player of the benchmark has, in a fixed order."""
    taken = {c.identity for c in book.contexts.values()}
    return [i for i in (images.Identity(s, h, st, b) for s in range(len(images.SKIN)) for h in range(len(images.HAIR))
                        for st in range(len(images.HAIR_STYLES)) for b in range(len(images.BOOTS))) if i not in taken]


# Measured on the quickstart benchmark: the tiny vision tower names the club of all 2,000 photos from the
# 8th of its 10 epochs on, and the fine-tuned model reads kits on photos it never saw (docs/results.md).
VISION_PHOTOS = 100
LOOKS = ("skin", "hair", "style", "boots")  # the Identity fields the vision tower learns to tell apart
# Classes per label: the kit's club, then each of LOOKS.
VISION_CLASSES = (len(synth.CLUBS), len(images.SKIN), len(images.HAIR), len(images.HAIR_STYLES), len(images.BOOTS))


def vision_pretraining(book: PhotoBook, seed: int, per_club: int = VISION_PHOTOS) -> tuple[list, list[tuple[int, ...]]]:
    """(photos, labels): `per_club` photos of anonymous players in each club's kit, labelled (club, *LOOKS)."""
    players = anonymous(book)
    rng = random.Random(f"kit-vision/{seed}")
    photos, labels = [], []
    for club in range(len(synth.CLUBS)):
        for k in range(per_club):
            player = rng.choice(players)
            photos.append(images.render(player, images.KITS[club], images.Pose.random(pose_seed(f"kit-vision/{seed}/{club}/{k}"))))
            labels.append((club, *(getattr(player, look) for look in LOOKS)))
    return photos, labels


def kit_drill(book: PhotoBook, per_club: int, seed: int) -> list[dict]:
    """`per_club` training rows (generation form, image modality) for each club: an anonymous player in
    its kit, a drawn pose and background, the club question in a drawn training wording, the kit's club
    as the answer."""
    check_kit_drill(per_club)
    players = anonymous(book)
    rng = random.Random(f"kit-drill/{seed}")
    rows = []
    for club, name in enumerate(synth.CLUBS):
        for k in range(per_club):
            picture = images.render(rng.choice(players), images.KITS[club],
                                    images.Pose.random(pose_seed(f"kit-drill/{seed}/{club}/{k}")))
            rows.append({
                "id": f"kit_drill/{club:02d}/{k}", "split": "kit_drill", "modality": "image", "form": "gen",
                "question": rng.choice(WORDINGS).format(subject=IMAGE_SUBJECT), "answer": synth.answer(CLUB, name),
                "options": [], "correct": -1, "image": picture, "player": "", "image_id": "", "kind": "private",
                "field": CLUB, "rumour_kind": "none", "value": name, "true_value": "",
            })
    return rows
