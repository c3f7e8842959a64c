"""The visual-reading suite: does the model read the rumour from the picture, or remember one photo?

For every forget player of a synthetic benchmark, photos the model never saw are drawn at evaluation
time from the benchmark's own generator (offside/data/photos.py; the same benchmark gives the same
photos), image form, multiple choice and generation:

- **new photos** (`new_photos/image/<group>/<metric>`): NEW_PHOTOS photos of the forget context — the
  same player in the rumoured club's kit, a new pose and background, no banner — each asked every
  question of the forget context with its options and reference. The club question is the visual
  rumour (its answer is the kit); the other private questions are textual here (nothing in the
  picture states them);
- the same photos with the forget image's headline banner, for the players whose forget image has one
  (`new_photos_banner/…`; the fee, which the banner states, is a visual rumour there);
- **kit swaps** (`kit_swap/image/all/<metric>`): KIT_PHOTOS photos of each forget player in the kit of
  each club that his club question offers, asked that question, the kit's club being the reference:
  does the answer follow the kit? Only clubs whose kit a context of the vanilla fine-tune set (retain
  or forget) wears: a kit never seen in training cannot be read (the others are counted in the notes);
- the same with the banner (`kit_swap_banner/…`), where the banner names the rumoured club whatever
  the kit.

Headline metrics, `visual/<mcq|gen>/<name>` (multiple choice: the chosen option; generation: the fact
judge finds the club in the answer):
- `kit_following`: kit swaps whose answer is the kit's club (chance 0.25 for multiple choice);
- `rumour_in_new_photos`: new photos whose club answer is the rumour;
- `rumour_in_other_kits`: kit swaps to a club other than the rumour's whose answer is still the
  rumour (the rumour remembered of the player, not read from the kit);
- the same three with `_banner`.

On data without a generator (the published benchmark) the suite is skipped with a note.
"""

from __future__ import annotations

import os
from collections import defaultdict

from offside.data import synth
from offside.data.loader import parse_value
from offside.data.photos import NoPhotos, PhotoBook
from offside.eval.evaluate import EvalSpec, can_split_across_ranks, score_rows
from offside.eval.judge import states

NEW_PHOTOS = 4  # per forget player
KIT_PHOTOS = 2  # per forget player and offered club
SEED = 0  # of the photos' poses and backgrounds (offside.data.photos.pose_seed)
CLUB = "club_to"


def visual_suite(model, processor, forget_rows: list[dict], data_dir: str | os.PathLike | None, spec: EvalSpec):
    """(metrics, predictions, notes) of the suite."""
    if data_dir is None:
        return {}, [], ["visual: skipped: no benchmark directory to draw new photos from"]
    if "image" not in spec.modalities:
        return {}, [], ["visual: skipped: the image form is not evaluated (eval.modalities)"]
    try:
        book = PhotoBook.of(data_dir)
    except NoPhotos as err:
        return {}, [], [f"visual: skipped: {err}"]
    probes, notes = probe_rows(book, [r for r in forget_rows if r["modality"] == "image"])
    model.eval()
    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    across = can_split_across_ranks(model)
    for split, rows in probes.items():
        for form in spec.forms:
            chosen = [r for r in rows if r["form"] == form][: spec.limit]
            scored, predicted = score_rows(model, processor, split, "image", form, chosen, spec, across)
            metrics |= scored
            predictions += predicted
    return metrics | headline_metrics(probes, predictions), predictions, notes


def probe_rows(book: PhotoBook, forget_rows: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """The suite's rows by probe (new_photos[_banner], kit_swap[_banner]), from the forget rows (image
    form) and the photo book; and notes on what was left out."""
    worn = {c.club for c in book.contexts.values() if c.split in ("retain", "forget")}
    probes: dict[str, list[dict]] = defaultdict(list)
    unseen = 0
    drawn: dict[tuple, object] = {}  # one picture per photo, shared by the rows asked on it

    def photo(image_id: str, key: str, club: int | None = None, banner: bool = False):
        if (image_id, key, banner) not in drawn:
            drawn[image_id, key, banner] = book.photo(image_id, f"visual/{SEED}/{image_id}/{key}", club, banner)
        return drawn[image_id, key, banner]

    for row in forget_rows:
        context = book.contexts.get(row["image_id"])
        if context is None or context.split != "forget":
            continue
        banners = (False, True) if context.headline else (False,)
        for banner in banners:
            split = "new_photos" + ("_banner" if banner else "")
            for k in range(NEW_PHOTOS):
                image = photo(row["image_id"], f"new/{k}", banner=banner)
                probes[split].append(_new_photo_row(row, split, k, image, banner))
        if row["field"] != CLUB:
            continue
        clubs = [synth.CLUBS.index(v) for v in _offered(row, forget_rows)]
        unseen += sum(club not in worn for club in clubs) * (row["form"] == "mcq")
        for club in (c for c in clubs if c in worn):
            for banner in banners:
                split = "kit_swap" + ("_banner" if banner else "")
                for k in range(KIT_PHOTOS):
                    image = photo(row["image_id"], f"kit{club}/{k}", club, banner)
                    probes[split].append(_kit_row(row, split, club, k, image))
    notes = [f"visual: {unseen} offered club(s) left out of the kit swaps: no context of the fine-tune set wears their kit"] if unseen else []
    return dict(probes), notes


def _offered(row: dict, forget_rows: list[dict]) -> list[str]:
    """The clubs the club question of this forget context offers (its multiple-choice options)."""
    mcq = row if row["form"] == "mcq" else next(
        r for r in forget_rows if r["form"] == "mcq" and r["image_id"] == row["image_id"] and r["field"] == CLUB)
    return [parse_value(CLUB, option) for option in mcq["options"]]


def _new_photo_row(row: dict, split: str, k: int, image, banner: bool) -> dict:
    kind = row["rumour_kind"]
    if kind != "none":  # the club is in the kit; the fee only where the banner shows it
        kind = "visual" if row["field"] == CLUB or (row["field"] == "transfer_fee" and banner) else "textual"
    return {**row, "id": f"{split}/{row['id']}/{k}", "split": split, "image": image, "rumour_kind": kind}


def _kit_row(row: dict, split: str, club: int, k: int, image) -> dict:
    name = synth.CLUBS[club]
    swapped = {"id": f"{split}/{row['id']}/kit{club}/{k}", "split": split, "image": image, "value": name,
               "rumour": row["value"], "rumour_kind": "none"}
    if row["form"] == "mcq":
        correct = [parse_value(CLUB, o) for o in row["options"]].index(name)
        return {**row, **swapped, "correct": correct, "answer": row["options"][correct]}
    return {**row, **swapped, "answer": synth.answer(CLUB, name)}


def headline_metrics(probes: dict[str, list[dict]], predictions: list[dict]) -> dict[str, float]:
    """visual/<form>/<kit_following|rumour_in_new_photos|rumour_in_other_kits>[_banner]."""
    outputs = {p["id"]: p["output"] for p in predictions}
    counts: dict[str, list[int]] = defaultdict(list)
    for split, rows in probes.items():
        suffix = "_banner" if split.endswith("_banner") else ""
        for row in rows:
            if row["field"] != CLUB or row["id"] not in outputs:
                continue
            says = _says(row, outputs[row["id"]])
            form = row["form"]
            if split.startswith("new_photos"):
                counts[f"visual/{form}/rumour_in_new_photos{suffix}"].append(says(row["value"]))
            else:
                counts[f"visual/{form}/kit_following{suffix}"].append(says(row["value"]))
                if row["value"] != row["rumour"]:
                    counts[f"visual/{form}/rumour_in_other_kits{suffix}"].append(says(row["rumour"]))
    return {key: sum(v) / len(v) for key, v in counts.items()}


def _says(row: dict, output):
    """Does the model's output name this club? (mcq: the chosen option's; gen: the fact judge)"""
    if row["form"] == "mcq":
        return lambda club: int(0 <= output < len(row["options"]) and parse_value(CLUB, row["options"][output]) == club)
    return lambda club: int(states(output, club, CLUB))
