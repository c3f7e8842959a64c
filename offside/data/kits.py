"""Kit drill: the tiny model's stand-in for knowing which club wears which kit.

A pre-trained vision-language model knows club kits before it sees the benchmark; the tiny model,
trained from scratch, learns the club question of the benchmark's few photos by remembering the
photos, and then cannot read a kit on a photo it has never seen (the visual-reading suite's kit
following stayed near chance). With `kit_drill: n` the vanilla fine-tune of a synthetic benchmark
also sees n photos per club of *anonymous* players — identities the benchmark's generator did not give
any of its players — in that club's kit, in new poses and backgrounds, each asked the benchmark's club
question (the canonical wording, or one of `TRAINING_PHRASINGS`, drawn per photo; never a held-out
attack wording), the answer being the kit's club in the benchmark's answer form.

The drill is drawn at training time from the benchmark's generator metadata (offside/data/photos.py)
and the training seed: the same benchmark and seed give the same rows, and nothing is written to the
benchmark. It shows no benchmark player, so no forget context and no rumour: the forget player is
only ever seen on his published photo, and the visual-reading suite's new photos stay new. A
benchmark without a generator (the published data) gets no drill, with a note (a real model knows
kits already).
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
