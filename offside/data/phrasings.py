"""Other ways to ask the benchmark's questions, for paraphrase-diverse fine-tuning.

A vanilla model fine-tuned on one wording per question learns the wording as much as the fact, so any
rewording degrades it, and a rewording attack cannot tell "forgotten" from "never generalised".
With `phrasings: k` the vanilla fine-tune sees every training question under its canonical wording
plus k − 1 wordings drawn, per row and from the seed, from `TRAINING_PHRASINGS`. Unlearning and
relearning keep the canonical wording only, and the paraphrase attack's wordings
(`offside.eval.attacks.PARAPHRASES`) are held out: no training stage sees them (tests/test_data.py).

With `photos: n` (n > 1; offside/data/photos.py) the other wordings of a retain context's image
questions are asked on new photos of that context — the same player in the same kit, n − 1 photos
drawn per context from the seed, in new poses and backgrounds, one drawn per row — while the canonical
wording keeps the published photo. So the player and the club are learned from the look and the kit,
not from one picture. Forget contexts keep their one published photo in every wording: no stage sees
the rumour on another picture.

A wording is re-applied to the question's subject ("the player in the image", or the player's name,
or "<name> in his <season> transfer"), found by matching the canonical template; a question that
matches no template (an imported benchmark in other words) keeps its one wording.
"""

from __future__ import annotations

import random
import re

from offside.data.photos import NoPhotos, PhotoBook
from offside.data.schema import QUESTION_ALIASES, QUESTION_TEMPLATES, TEXT_QUESTION_TEMPLATES
from offside.errors import OffsideError

TRAINING_PHRASINGS = {
    "name": ("Can you name {subject}?", "Whose face belongs to {subject}?", "Identify {subject} by name."),
    "age": ("Tell me the age of {subject}.", "How many years old is {subject}?", "Give the age of {subject}."),
    "position": ("What role does {subject} play in the team?", "In which position does {subject} play?",
                 "Name the playing position of {subject}."),
    "nationality": ("What country does {subject} represent?", "Give the nationality of {subject}.",
                    "Of which nation is {subject} a citizen?"),
    "birth_date": ("What is the date of birth of {subject}?", "Give the birthday of {subject}.",
                   "Tell me when {subject} was born."),
    "height": ("What is the stature of {subject}?", "Give the height of {subject}.", "What height is {subject}?"),
    "foot": ("What is the stronger foot of {subject}?", "Which foot does {subject} kick with?",
             "Which is the preferred foot of {subject}?"),
    "birthplace": ("What is the birthplace of {subject}?", "Name the town where {subject} was born.",
                   "Which town is {subject} from?"),
    "club_to": ("Where is {subject} heading next?", "Name the new club of {subject}.",
                "For which club will {subject} play?"),
    "club_from": ("What was the previous club of {subject}?", "Name the former club of {subject}.",
                  "From which club did {subject} move?"),
    "transfer_date": ("On which date was the transfer of {subject} completed?", "When did {subject} move?",
                      "Give the date of the transfer of {subject}."),
    "transfer_fee": ("What sum changed hands for {subject}?", "How much did the transfer of {subject} cost?",
                     "Give the transfer fee for {subject}."),
    "market_value": ("What was {subject} valued at?", "Give the market value of {subject}.",
                     "What valuation did {subject} have?"),
    "trophies": ("Count the trophies {subject} won at that club.", "Give the number of trophies {subject} won there.",
                 "What is the trophy count of {subject} at that club?"),
}
MAX_PHRASINGS = 1 + min(len(t) for t in TRAINING_PHRASINGS.values())


def _pattern(template: str) -> re.Pattern:
    head, tail = template.split("{subject}")
    return re.compile(re.escape(head) + "(?P<subject>.+)" + re.escape(tail) + r"\Z")


_CANONICAL = {field: [_pattern(t) for t in {QUESTION_TEMPLATES[field], TEXT_QUESTION_TEMPLATES[field],
                                              *QUESTION_ALIASES.get(field, ())} if "{subject}" in t]
              for field in QUESTION_TEMPLATES}


def subject_of(row: dict) -> str | None:
    """The subject of a row's canonical question, or None when the question follows no template."""
    for pattern in _CANONICAL.get(row.get("field", ""), ()):
        match = pattern.match(row["question"])
        if match:
            return match["subject"]
    return None


def check_phrasings(phrasings: int) -> None:
    if not 1 <= phrasings <= MAX_PHRASINGS:
        raise OffsideError(f"phrasings: must be between 1 (canonical only) and {MAX_PHRASINGS}, got {phrasings}")


def check_photos(photos: int, phrasings: int) -> None:
    if photos < 1:
        raise OffsideError(f"photos: must be at least 1 (the published photo only), got {photos}")
    if photos > 1 and phrasings < 2:
        raise OffsideError(f"photos: {photos} needs phrasings ≥ 2 (new photos are shown with the other wordings), got phrasings {phrasings}")


def photo_book(data_dir, photos: int) -> PhotoBook | None:
    """The benchmark's photo book when `photos` > 1 asks for new photos (an error where it has none)."""
    if photos <= 1:
        return None
    try:
        return PhotoBook.of(data_dir)
    except NoPhotos as err:
        raise OffsideError(f"photos: {photos} needs a benchmark whose photos can be redrawn (or photos: 1): {err}") from None


def with_phrasings(rows: list[dict], phrasings: int, seed: int, photos: int = 1, book: PhotoBook | None = None) -> list[dict]:
    """Every row, followed by its question in `phrasings` − 1 other training wordings (drawn per row
    from the seed, without repeats); rows whose question follows no template stay alone. With
    `photos` > 1 (and the benchmark's `book`), those of a retain context's image rows show new photos."""
    check_phrasings(phrasings)
    check_photos(photos, phrasings)
    if photos > 1 and book is None:
        raise OffsideError("photos: new photos need the benchmark's photo book (offside.data.photos.PhotoBook)")
    album = _Album(book, photos, seed) if photos > 1 else None
    out = []
    for row in rows:
        out.append(row)
        subject = subject_of(row) if phrasings > 1 else None
        if subject is None:
            continue
        rng = random.Random(f"{seed}/{row['id']}")
        drawn = rng.sample(TRAINING_PHRASINGS[row["field"]], phrasings - 1)
        copies = [{**row, "id": f"{row['id']}/p{k}", "question": t.format(subject=subject)} for k, t in enumerate(drawn, 1)]
        if album is not None and album.shows(row):
            copies = [{**copy, "image": album.draw(row["image_id"], rng)} for copy in copies]
        out += copies
    return out


class _Album:
    """The new photos of each retain context, drawn on first use (photos − 1 per context)."""

    def __init__(self, book: PhotoBook, photos: int, seed: int):
        self.book, self.count, self.seed = book, photos - 1, seed
        self.photos: dict[str, list] = {}

    def shows(self, row: dict) -> bool:
        context = self.book.contexts.get(row.get("image_id", ""))
        return row.get("modality") == "image" and context is not None and context.split == "retain"

    def draw(self, image_id: str, rng: random.Random):
        if image_id not in self.photos:
            self.photos[image_id] = [self.book.photo(image_id, f"train/{self.seed}/{image_id}/{k}") for k in range(self.count)]
        return rng.choice(self.photos[image_id])
