"""New photos of a synthetic benchmark's image contexts, drawn at run time.

A synthetic benchmark can be redrawn: `offside_metadata.json` names its generator, version, seed and
number of players, and the generator's first draws (`synth.draw_players`) give back every player's
look and every image context's club (its kit) and headline banner. `PhotoBook.of(DIR)` rebuilds them
and checks them against the benchmark's own metadata; a benchmark without a generator (the published
data) or whose files disagree with their generator has no photo book (`NoPhotos`, with the reason).

A new photo is the player in a kit (the context's own, or any club's) in a pose and background drawn
from a key: the same key gives the same picture, and no key used here is one the generator used.
Two users:
- the tiny vanilla fine-tune (`offside.data.phrasings.with_phrasings`): the other wordings of a retain
  context's image questions are asked on new photos of that context, so the player and the club are
  learned from the look and the kit, not from one picture. A forget context is only ever shown on its
  published photo: no stage sees the rumour on any other picture;
- the visual-reading suite (`offside.eval.visual`): the forget players on new photos, in the
  rumoured kit and in the kit of each club the club question offers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from offside.data import images, synth
from offside.data.schema import METADATA_FILE
from offside.errors import OffsideError


class NoPhotos(OffsideError):
    """The benchmark cannot be redrawn (the message says why)."""


@dataclass(frozen=True)
class Context:
    """What every photo of an image context shows."""
    player: str
    split: str          # retain | forget | relearn
    identity: images.Identity
    club: int           # index into synth.CLUBS and images.KITS
    headline: str | None  # the banner of its published photo (forget contexts only), or None


def pose_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


class PhotoBook:
    def __init__(self, contexts: dict[str, Context]):
        self.contexts = contexts  # by image_id ("0004")

    @classmethod
    def of(cls, data_dir: str | os.PathLike) -> PhotoBook:
        meta = _generator_metadata(Path(data_dir))
        players = synth.draw_players(meta["players"], meta["seed"])
        contexts = {f"{c['image_id']:04d}": Context(p.name, c["split"], p.identity, c["club"], synth.headline(p, c))
                    for p in players for c in p.contexts}
        _check_against(contexts, meta, Path(data_dir))
        return cls(contexts)

    def forget_contexts(self) -> dict[str, Context]:
        return {image_id: c for image_id, c in self.contexts.items() if c.split == "forget"}

    def photo(self, image_id: str, key: str, club: int | None = None, banner: bool = False) -> Image.Image:
        """A new photo of a context: its player, in the kit of `club` (default: the context's own),
        with the context's headline banner if `banner` and it has one; pose and background from `key`."""
        context = self.contexts[image_id]
        kit = images.KITS[context.club if club is None else club]
        return images.render(context.identity, kit, images.Pose.random(pose_seed(key)), context.headline if banner else None)


def _generator_metadata(data_dir: Path) -> dict:
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise NoPhotos(f"{data_dir}: no {METADATA_FILE}: not a synthetic benchmark (published data carries no generator)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("generator") != "offside.data.synth":
        raise NoPhotos(f"{path}: generator {meta.get('generator')!r} is not offside.data.synth")
    if meta.get("version") != synth.GENERATOR_VERSION:
        raise NoPhotos(f"{path}: generator version {meta.get('version')!r}, this code draws version {synth.GENERATOR_VERSION}")
    if not isinstance(meta.get("seed"), int) or not isinstance(meta.get("players"), int):
        raise NoPhotos(f"{path}: needs integer 'seed' and 'players' to redraw the benchmark")
    return meta


def _check_against(contexts: dict[str, Context], meta: dict, data_dir: Path) -> None:
    """Every record's player and every club question's answer must be the generator's."""
    clubs = {image_id: synth.CLUBS[c.club] for image_id, c in contexts.items()}
    for name, entries in meta["files"].items():
        for i, entry in enumerate(entries):
            context = contexts.get(entry.get("image_id"))
            if context is None or context.player != entry.get("player") or (
                    entry.get("field") == "club_to" and clubs[entry["image_id"]] != entry.get("value")):
                raise NoPhotos(f"{data_dir / METADATA_FILE}: files[{name!r}][{i}] differs from what its generator "
                               f"draws (seed {meta['seed']}, {meta['players']} players): the files were changed")
