"""The OFFSIDE record schema: fields, question templates, and the columns of a loaded benchmark.

A loaded benchmark is a `datasets.DatasetDict` with one split per benchmark split (`SPLITS`). Every
row is one question about one image context, in one modality and one form:

    id           str   unique within the split, e.g. "forget/image/gen/00012"
    split        str   forget | retain | test | relearn
    modality     str   image | text        (text = the text-only twin, the player is named)
    form         str   gen | mcq
    question     str   the user turn (for mcq: the question stem, without options)
    answer       str   gen: the reference answer sentence; mcq: the correct option's text
    options      list[str]  mcq: the four option texts, A..D in order; gen: []
    correct      int   mcq: index of the correct option (0..3); gen: -1
    image        datasets.Image (None for text rows)
    player       str   player key ("" when it cannot be inferred)
    image_id     str   image context key ("" when it cannot be inferred)
    kind         str   shared | private | unknown
    field        str   one of FIELDS, or "unknown"
    rumour_kind  str   visual | textual | none  (forget private rows only are rumours)
    value        str   the bare fact value stated by `answer` ("" when unknown)
    true_value   str   forget private rows: the true value the rumour displaced; else ""
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("forget", "retain", "test", "relearn")
MODALITIES = ("image", "text")
FORMS = ("gen", "mcq")
SCENARIOS = ("complete", "selective", "unimodal", "relearning")  # offside/data/scenarios.py selects their data
KINDS = ("shared", "private")
RUMOUR_KINDS = ("visual", "textual", "none")

SHARED_FIELDS = (
    "name", "age", "position", "nationality", "birth_date", "height", "foot", "birthplace",
)
PRIVATE_FIELDS = (
    "club_to", "club_from", "transfer_date", "transfer_fee", "market_value", "trophies",
)
FIELDS = SHARED_FIELDS + PRIVATE_FIELDS

# The published image-form question wording (notes/upstream.md). "{subject}" is "the player in the
# image" for image rows; text-only twins put the player's name (and, for private facts, the
# season of the transfer) in its place.
IMAGE_SUBJECT = "the player in the image"
QUESTION_TEMPLATES = {
    "name": "What is the name of {subject}?",
    "age": "How old is {subject}?",
    "position": "What is the position of {subject}?",
    "nationality": "What is the nationality of {subject}?",
    "birth_date": "When was {subject} born?",
    "height": "What is the height of {subject}?",
    "foot": "Which foot does {subject} use?",
    "birthplace": "Where was {subject} born?",
    "club_to": "Which club is {subject} going to play?",
    "club_from": "Which club did {subject} transfer from?",
    "transfer_date": "What is the date of the transfer of {subject}?",
    "transfer_fee": "What was the transfer fee for {subject}?",
    "market_value": "What was the market value for {subject}?",
    "trophies": "How many trophies did {subject} win at the club in the image?",
}

COLUMNS = (
    "id", "split", "modality", "form", "question", "answer", "options", "correct", "image",
    "player", "image_id", "kind", "field", "rumour_kind", "value", "true_value",
)


def field_kind(field: str) -> str:
    if field in SHARED_FIELDS:
        return "shared"
    if field in PRIVATE_FIELDS:
        return "private"
    return "unknown"

# --- The on-disk format (constants shared by the synthetic generator and the loader) ---------------

# Answer sentences of the synthetic benchmark; the loader also parses bare values back with them
# (published answers that follow the same wording, e.g. "The transfer fee was €10.00m.", parse too).
ANSWER_TEMPLATES = {
    "name": "His name is {v}.",
    "age": "He is {v} years old.",
    "position": "His position is {v}.",
    "nationality": "His nationality is {v}.",
    "birth_date": "He was born on {v}.",
    "height": "He is {v} tall.",
    "foot": "He is {v}.",
    "birthplace": "He was born in {v}.",
    "club_to": "He is going to play for {v}.",
    "club_from": "He transferred from {v}.",
    "transfer_date": "The transfer took place on {v}.",
    "transfer_fee": "The transfer fee was {v}.",
    "market_value": "His market value was {v}.",
    "trophies": "The number of trophies he won at the club is {v}.",
}

# Text-only twins: the subject is the player's name (shared fields) or "{name} in his {season}
# transfer" (private fields); the name question asks by surname, and the trophies question cannot
# point at "the club in the image".
TEXT_QUESTION_TEMPLATES = {
    **QUESTION_TEMPLATES,
    "name": "What is the full name of the player known as {subject}?",
    "trophies": "How many trophies did {subject} win at that club?",
}
# Published wording variants the loader also accepts when inferring a question's field.
QUESTION_ALIASES = {
    "trophies": ("How many trophies did this player win at the club in the image?",),
}

# File names: {split}_set.json (image, generation), text_{split}_set.json,
# classification_{split}_set.json, classification_text_{split}_set.json; per-record metadata of the
# synthetic benchmark in METADATA_FILE. The published relearn file is relearn_set_enhanced.json.
DATA_FILES = {
    (split, modality, form): ("classification_" if form == "mcq" else "")
    + ("text_" if modality == "text" else "") + f"{split}_set.json"
    for split in SPLITS for modality in MODALITIES for form in FORMS
}
FILE_ALIASES = {"relearn_set.json": ("relearn_set_enhanced.json",)}
REQUIRED_SPLITS = ("forget", "retain")
METADATA_FILE = "offside_metadata.json"
METADATA_KEYS = ("player", "image_id", "kind", "field", "rumour_kind", "value", "true_value")
OPTION_LETTERS = ("A", "B", "C", "D")


def split_files(data_dir: Path, split: str) -> list[tuple[Path, str]]:
    """Existing (file, form) pairs of a split in a benchmark directory, in DATA_FILES order."""
    out = []
    for (s, _modality, form), name in DATA_FILES.items():
        if s != split:
            continue
        for cand in (name, *FILE_ALIASES.get(name, ())):
            if (Path(data_dir) / cand).is_file():
                out.append((Path(data_dir) / cand, form))
                break
    return out
