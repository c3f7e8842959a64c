"""A synthetic OFFSIDE benchmark: fictitious players, written in the published file format.

Per player (index p) there are five image contexts, image ids 5p+0..5p+4:
  5p+1..5p+3  retain   three past transfers (seasons 2017-2023), each to a different club
  5p+4        forget   the RUMOURED 2024 transfer (the player wears the rumoured club's kit)
  5p+0        relearn  the TRUE 2024 transfer (another club, fee, date, ...)
plus three test photos (other photos of the three retain contexts), i.e. 8 images per player.
Every image context gets the 14 questions of `schema.QUESTION_TEMPLATES` (8 shared, 6 private), as a
generation record and as a 4-option multiple-choice record, and every record has a text-only twin.

`generate` writes (see `schema.DATA_FILES`) {split}_set.json, text_{split}_set.json,
classification_{split}_set.json, classification_text_{split}_set.json, images/*.png and
offside_metadata.json (per file, per record: player, image_id, kind, field, rumour_kind, value,
true_value). Same seed -> byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field as dc_field, replace
from pathlib import Path

from PIL import Image

from offside.data import images
from offside.data.schema import (
    ANSWER_TEMPLATES, DATA_FILES, FIELDS, IMAGE_SUBJECT, METADATA_FILE, OPTION_LETTERS,
    PRIVATE_FIELDS, QUESTION_TEMPLATES, TEXT_QUESTION_TEMPLATES, field_kind,
)
from offside.errors import OffsideError

GENERATOR_VERSION = 1
RUMOUR_SEASON = 2024
PAST_SEASONS = range(2017, 2024)
REFERENCE_DATE = dt.date(2024, 6, 1)  # ages are as of this date
MAX_PLAYERS = 200

CLUBS = (
    "Redford United", "Ashby Rovers", "Kingsmere City", "Halden Athletic", "Northgate Albion",
    "Wexham Town", "Ravensholm FC", "Brackwater Wanderers", "Eastmoor Rangers", "Thornbury County",
    "Millbrook Forest", "Castleton Villa", "Stanmore Palace", "Greywell Harriers", "Oakridge Orient",
    "Fallowfield Argyle", "Dunmere Athletic", "Pemberton Hotspur", "Coldharbour Rovers",
    "Westlake Dynamo",
)
assert len(CLUBS) == len(images.KITS)
FIRST_NAMES = (
    "Marco", "Luca", "Tomas", "Andre", "Felix", "Jonas", "Mateo", "Adrian", "Nico", "Hugo", "Emil",
    "Rafael", "Oskar", "Dario", "Milan", "Leon", "Elias", "Viktor", "Bruno", "Samir", "Kofi",
    "Iker", "Pavel", "Ruben",
)
SURNAME_HEADS = ("Ald", "Bren", "Cor", "Dal", "Fen", "Gar", "Hol", "Kel", "Lan", "Mor", "Nor",
                 "Pell", "Quin", "Rad", "Sol", "Tor", "Vel", "Wyn")
SURNAME_TAILS = ("ric", "son", "ley", "mont", "ard", "ov", "ez", "ini", "berg", "ado", "ski",
                 "ton", "ek", "as")
NATIONALITIES = ("Valdorian", "Estmarkian", "Lusarian", "Norvessan", "Caldrian", "Ostrelian",
                 "Merovan", "Tarvish", "Brennic", "Sardovan", "Quellish", "Ardanian")
TOWNS = ("Ostravel", "Brindlemoor", "Carrowfen", "Duskport", "Elmhaven", "Farrowgate",
         "Glimmerton", "Hollowmere", "Ironbridge", "Jasperfield", "Kestrelby", "Larkspur",
         "Mistral Bay", "Northwick", "Oldcastle", "Pinewold")
POSITIONS = ("goalkeeper", "centre-back", "full-back", "defensive midfielder",
             "central midfielder", "attacking midfielder", "winger", "striker")
FOOT = ("right-footed", "left-footed", "two-footed", "one-footed")  # players get the first three
TROPHIES = range(0, 8)


def _date(d: dt.date) -> str:
    return f"{d.day} {d:%B %Y}"


def sample_value(field: str, rng: random.Random, season: int = RUMOUR_SEASON) -> str:
    """One plausible value of a field (facts and multiple-choice distractors both come from here)."""
    if field == "name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAME_HEADS)}{rng.choice(SURNAME_TAILS)}"
    if field == "age":
        return str(rng.randint(18, 35))
    if field == "birth_date":
        return _date(dt.date(1988, 1, 1) + dt.timedelta(days=rng.randrange(19 * 365)))
    if field == "height":
        return f"{rng.randint(168, 198) / 100:.2f} m"
    if field == "transfer_date":
        return _date(dt.date(season, 6, 1) + dt.timedelta(days=rng.randrange(92)))
    if field in ("transfer_fee", "market_value"):
        return f"€{rng.randint(2, 480) / 4:.2f}m"
    pools = {"position": POSITIONS, "nationality": NATIONALITIES, "foot": FOOT,
             "birthplace": TOWNS, "club_to": CLUBS, "club_from": CLUBS, "trophies": TROPHIES}
    return str(rng.choice(pools[field]))


@dataclass(frozen=True)
class Item:
    """One question about one image context; rendered as 4 records (2 modalities x 2 forms)."""
    split: str
    player: str          # the player's full name (unique; also the player key)
    surname: str
    season: int
    image: str           # relative image path
    image_id: str        # image context key (a test photo keeps its retain context's id)
    field: str
    value: str
    true_value: str = ""
    rumour_kind: str = "none"
    options: tuple[str, ...] = ()    # four values, options[correct] == value
    correct: int = 0


def question(item: Item, modality: str) -> str:
    if modality == "image":
        return QUESTION_TEMPLATES[item.field].format(subject=IMAGE_SUBJECT)
    if item.field == "name":
        subject = item.surname
    elif field_kind(item.field) == "shared":
        subject = item.player
    else:
        subject = f"{item.player} in his {item.season} transfer"
    return TEXT_QUESTION_TEMPLATES[item.field].format(subject=subject)


def answer(field: str, value: str) -> str:
    return ANSWER_TEMPLATES[field].format(v=value)


def records(item: Item) -> dict[tuple[str, str], dict]:
    """The four published-format records of an item, keyed by (modality, form)."""
    out = {}
    options = {L: answer(item.field, v) for L, v in zip(OPTION_LETTERS, item.options)}
    for modality in ("image", "text"):
        q = question(item, modality)
        img = {"images": item.image} if modality == "image" else {}
        out[modality, "gen"] = {"messages": [{"role": "user", "content": q}, {
            "role": "assistant", "content": answer(item.field, item.value)}], **img}
        out[modality, "mcq"] = {"Question": q, "Options": options,
                                "Correct_Answer": OPTION_LETTERS[item.correct], **img}
    return out


def _with_options(item: Item, rng: random.Random, must: str = "", never: str = "") -> Item:
    """Four options: the answer, `must` if given, and random values of the field other than `never`."""
    values = [item.value] + ([must] if must else [])
    while len(values) < 4:
        v = sample_value(item.field, rng, item.season)
        if v not in values and v != never:
            values.append(v)
    rest = values[1:]
    rng.shuffle(rest)
    correct = rng.randrange(4)
    return replace(item, options=tuple(rest[:correct] + [item.value] + rest[correct:]), correct=correct)


@dataclass
class Player:
    name: str
    surname: str
    shared: dict[str, str]
    identity: images.Identity
    contexts: list[dict] = dc_field(default_factory=list)  # split, image_id, season, club, facts, headline


def draw_players(n: int, seed: int) -> list[Player]:
    """The players of the benchmark `build(n, seed)` makes, with their image contexts (its first draws)."""
    return _players(n, random.Random(seed), seed)


def headline(player: Player, context: dict) -> str | None:
    """The banner text of a context's photos, e.g. "VELL TO REDFORD EUR 45.25M", or None."""
    if not context["headline"]:
        return None
    facts = context["facts"]
    fee = facts["transfer_fee"].replace("€", "EUR ").upper()  # the font lacks "€"
    return f"{player.surname.upper()} TO {facts['club_to'].split()[0].upper()} {fee}"


def _players(n: int, rng: random.Random, seed: int) -> list[Player]:
    surnames = rng.sample([h + t for h in SURNAME_HEADS for t in SURNAME_TAILS], n)
    out = []
    for p, (surname, ident) in enumerate(zip(surnames, images.identities(n, seed))):
        age = rng.randint(19, 34)
        latest = REFERENCE_DATE.replace(year=REFERENCE_DATE.year - age)
        earliest = REFERENCE_DATE.replace(year=REFERENCE_DATE.year - age - 1) + dt.timedelta(days=1)
        born = earliest + dt.timedelta(days=rng.randrange((latest - earliest).days + 1))
        name = f"{rng.choice(FIRST_NAMES)} {surname}"
        shared = {"name": name, "age": str(age), "position": rng.choice(POSITIONS),
                  "nationality": rng.choice(NATIONALITIES), "birth_date": _date(born),
                  "height": sample_value("height", rng), "foot": rng.choice(FOOT[:3]),
                  "birthplace": rng.choice(TOWNS)}
        player = Player(name, surname, shared, ident)
        start, *retain_clubs, true_club, rumour_club = rng.sample(range(len(CLUBS)), 6)
        frm = start
        for k, season in enumerate(sorted(rng.sample(PAST_SEASONS, 3)), start=1):
            player.contexts.append(_context(rng, "retain", 5 * p + k, season, retain_clubs[k - 1], frm))
            frm = retain_clubs[k - 1]
        truth = _context(rng, "relearn", 5 * p, RUMOUR_SEASON, true_club, frm)
        rumour_from = rng.choice([c for c in range(len(CLUBS)) if c not in (frm, true_club, rumour_club)])
        while True:  # the rumour differs from the truth in every private fact
            rumour = _context(rng, "forget", 5 * p + 4, RUMOUR_SEASON, rumour_club, rumour_from)
            if all(rumour["facts"][f] != truth["facts"][f] for f in PRIVATE_FIELDS):
                break
        rumour["headline"] = rng.random() < 0.5
        player.contexts += [truth, rumour]
        out.append(player)
    return out


def _context(rng: random.Random, split: str, image_id: int, season: int, club: int, frm: int) -> dict:
    facts = {"club_to": CLUBS[club], "club_from": CLUBS[frm],
             **{f: sample_value(f, rng, season) for f in ("transfer_date", "transfer_fee",
                                                         "market_value", "trophies")}}
    return {"split": split, "image_id": image_id, "season": season, "club": club, "facts": facts,
            "headline": False}


def build(players: int, seed: int) -> tuple[list[Item], dict[str, Image.Image]]:
    """All items and all pictures (relative path -> PIL image) of a benchmark."""
    if not 1 <= players <= MAX_PLAYERS:
        raise OffsideError(f"players: must be between 1 and {MAX_PLAYERS}, got {players}")
    rng = random.Random(seed)
    items: list[Item] = []
    pictures = {}
    for pl in _players(players, rng, seed):
        by_split = {c["split"]: c for c in pl.contexts}
        photos = [(c, c["split"], f"images/{c['image_id']:04d}.png") for c in pl.contexts]
        photos += [(c, "test", f"images/{c['image_id']:04d}_test.png")
                   for c in pl.contexts if c["split"] == "retain"]
        for ctx, split, path in photos:
            facts = ctx["facts"]
            banner = headline(pl, ctx)
            pictures[path] = images.render(pl.identity, images.KITS[ctx["club"]],
                                           images.Pose.random(rng.randrange(2**32)), banner)
            for f in FIELDS:
                item = Item(split, pl.name, pl.surname, ctx["season"], path,
                            f"{ctx['image_id']:04d}", f, {**pl.shared, **facts}[f])
                must = never = ""
                if split == "forget" and f in PRIVATE_FIELDS:
                    # As in the published protocol, the rumour competes with random values of the field
                    # (never the truth), so a forget question measures whether the rumour is still there.
                    visual = f == "club_to" or (f == "transfer_fee" and banner is not None)
                    item = replace(item, true_value=by_split["relearn"]["facts"][f],
                                   rumour_kind="visual" if visual else "textual")
                    never = item.true_value
                elif split == "relearn" and f in PRIVATE_FIELDS:
                    # The truth competes with the rumour: has corrective relearning displaced it?
                    must = by_split["forget"]["facts"][f]
                items.append(_with_options(item, rng, must, never))
    return items, pictures


def _dump(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")


def generate(out_dir: str | os.PathLike, players: int = 80, seed: int = 0) -> Path:
    """Write a synthetic benchmark to out_dir (must not exist or be empty); returns out_dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffsideError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    items, pictures = build(players, seed)
    files: dict[str, list] = {name: [] for name in DATA_FILES.values()}
    meta: dict[str, list] = {name: [] for name in DATA_FILES.values()}
    for item in items:
        entry = {"player": item.player, "image_id": item.image_id, "kind": field_kind(item.field),
                 "field": item.field, "rumour_kind": item.rumour_kind, "value": item.value,
                 "true_value": item.true_value}
        for (modality, form), rec in records(item).items():
            name = DATA_FILES[item.split, modality, form]
            files[name].append(rec)
            meta[name].append(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        for path, img in pictures.items():
            img.save(tmp / path, format="PNG", optimize=False)
        for name, recs in files.items():
            (tmp / name).write_bytes(_dump(recs))
        (tmp / METADATA_FILE).write_bytes(_dump({
            "generator": "offside.data.synth", "version": GENERATOR_VERSION, "seed": seed,
            "players": players, "files": meta}))
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
