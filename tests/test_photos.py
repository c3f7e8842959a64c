"""New photos of a synthetic benchmark's contexts (offside/data/photos.py): redrawn from its metadata,
the same player, kit and banner as its published photos, refused for data without a generator; and the
tiny fine-tune's use of them (other wordings of retain questions on new photos, forget photos never)."""

import json
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest

from offside.cli import main
from offside.data import images, synth
from offside.data.loader import load_benchmark
from offside.data.photos import NoPhotos, PhotoBook
from offside.data.phrasings import photo_book, with_phrasings
from offside.data.rows import materialise
from offside.errors import OffsideError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("photos") / "bench", players=3, seed=7)


@pytest.fixture(scope="module")
def training(bench):
    ds = load_benchmark(bench)
    return [r for split in ("retain", "forget") for r in materialise(ds[split]) if r["form"] == "gen"]


def test_the_book_redraws_every_published_photo_s_player_kit_and_banner(bench, monkeypatch):
    """What the generator rendered for each published photo (player, kit, banner) is what the book
    says of that photo's context; only the pose differs between photos."""
    drawn = []
    real = images.render
    monkeypatch.setattr(synth.images, "render", lambda *args: drawn.append(args) or real(*args))
    _, pictures = synth.build(3, 7)
    book = PhotoBook.of(bench)
    assert len(drawn) == len(pictures) == 3 * 8
    for path, (identity, kit, pose, banner) in zip(pictures, drawn):
        context = book.contexts[path.split("/")[1][:4]]
        assert (context.identity, images.KITS[context.club], context.headline) == (identity, kit, banner)
    assert Counter(c.split for c in book.contexts.values()) == {"retain": 9, "forget": 3, "relearn": 3}
    forget = book.forget_contexts()
    assert any(c.headline for c in forget.values())  # seed 7: a banner on some forget image
    image_id, context = next((i, c) for i, c in forget.items() if c.headline)
    plain, again = book.photo(image_id, "k"), book.photo(image_id, "k")
    assert plain.tobytes() == again.tobytes() and plain.size == (224, 224)  # the key decides the picture
    assert book.photo(image_id, "other").tobytes() != plain.tobytes()
    banner = book.photo(image_id, "k", banner=True)
    assert banner.crop((0, 0, 224, 30)).tobytes() != plain.crop((0, 0, 224, 30)).tobytes()
    assert banner.crop((0, 31, 224, 224)).tobytes() == plain.crop((0, 31, 224, 224)).tobytes()
    other = next(c for c in range(len(synth.CLUBS)) if c != context.club)
    swapped = book.photo(image_id, "k", club=other)
    assert _count(swapped, images.KITS[other][0]) > 500 and _count(swapped, images.KITS[context.club][0]) < _count(plain, images.KITS[context.club][0])


def _count(image, colour) -> int:
    return int((np.asarray(image) == colour).all(-1).sum())


def test_data_without_a_generator_or_changed_since_has_no_book(bench, tmp_path):
    from test_data import _published

    with pytest.raises(NoPhotos, match="no offside_metadata.json: not a synthetic benchmark"):
        PhotoBook.of(_published(tmp_path / "pub"))
    changed = tmp_path / "changed"
    shutil.copytree(bench, changed)
    meta = json.loads((changed / "offside_metadata.json").read_text())
    meta["files"]["forget_set.json"][0]["player"] = "Someone Else"
    (changed / "offside_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(NoPhotos, match=r"files\['forget_set.json'\]\[0\] differs from what its generator draws"):
        PhotoBook.of(changed)
    meta["files"]["forget_set.json"][0]["player"] = json.loads((bench / "offside_metadata.json").read_text())["files"]["forget_set.json"][0]["player"]
    meta["seed"] = 8
    (changed / "offside_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(NoPhotos, match="differs from what its generator draws"):
        PhotoBook.of(changed)
    assert photo_book(changed, 1) is None  # one photo: the published one, nothing to redraw
    with pytest.raises(OffsideError, match="photos: 4 needs a benchmark whose photos can be redrawn"):
        photo_book(changed, 4)


def test_other_wordings_of_retain_questions_show_new_photos_and_forget_photos_never_change(bench, training):
    book = PhotoBook.of(bench)
    rows = with_phrasings(training, 3, seed=0, photos=4, book=book)
    assert [(r["id"], r["question"]) for r in rows] == [(r["id"], r["question"]) for r in with_phrasings(training, 3, seed=0)]
    published = {r["id"]: r["image"] for r in training}
    per_context = defaultdict(set)
    for row in rows:
        original = published[row["id"].split("/p")[0]]
        if row["modality"] == "text" or row["id"] in published or row["split"] == "forget":
            assert row["image"] is original  # text rows, canonical wordings and the forget image stay
        else:
            assert row["image"] is not original and row["image"].tobytes() != original.tobytes()
            per_context[row["image_id"]].add(row["image"].tobytes())
    assert len(per_context) == 9 and all(len(photos) == 3 for photos in per_context.values())  # photos − 1 new ones
    again = with_phrasings(training, 3, seed=0, photos=4, book=book)
    assert [r["image"].tobytes() for r in again if r["image"]] == [r["image"].tobytes() for r in rows if r["image"]]
    other_seed = with_phrasings(training, 3, seed=1, photos=4, book=book)
    new = next(r for r in other_seed if r["id"].endswith("/p1") and r["split"] == "retain" and r["modality"] == "image")
    assert new["image"].tobytes() not in per_context[new["image_id"]]
    with pytest.raises(OffsideError, match="photos: 4 needs phrasings ≥ 2"):
        with_phrasings(training, 1, seed=0, photos=4, book=book)
    with pytest.raises(OffsideError, match="photos: must be at least 1"):
        with_phrasings(training, 3, seed=0, photos=0, book=book)


def test_finetune_refuses_new_photos_it_cannot_draw_before_any_work(tmp_path, capsys):
    from test_data import _published

    data = _published(tmp_path / "pub")
    out = tmp_path / "o"
    assert main(["finetune", "--data", str(data), "--model", "tiny", "--out", str(out), "--set", "photos=3"]) == 2
    err = capsys.readouterr().err
    assert "photos: 3 needs a benchmark whose photos can be redrawn (or photos: 1)" in err and not out.exists()
    assert main(["finetune", "--data", str(data), "--model", "tiny", "--out", str(out), "--phrasings", "1", "--set", "photos=2"]) == 2
    assert "photos: 2 needs phrasings ≥ 2" in capsys.readouterr().err and not out.exists()


def test_kit_drill_rows_show_anonymous_players_in_each_club_s_kit(bench, monkeypatch):
    """The kit drill (offside/data/kits.py): per club, photos of players the benchmark does not have in
    that club's kit, asked the club question in a training wording, answered with the kit's club; the
    same for the same seed; none for data without a generator."""
    from test_data import _published

    from offside.data.kits import WORDINGS, anonymous, drill_book, kit_drill
    from offside.data.schema import IMAGE_SUBJECT

    book, notes = drill_book(bench, 2)
    assert book is not None and notes == []
    players = {c.identity for c in book.contexts.values()}
    assert players and not players & set(anonymous(book))
    drawn = []
    render = images.render
    monkeypatch.setattr(images, "render", lambda identity, kit, pose, headline=None: drawn.append((identity, kit, headline))
                        or render(identity, kit, pose, headline))
    rows = kit_drill(book, 2, seed=0)
    assert len(rows) == 2 * len(synth.CLUBS) and len(drawn) == len(rows)
    wordings = {w.format(subject=IMAGE_SUBJECT) for w in WORDINGS}
    # the canonical wording and the training ones (tests/test_data.py: none is a held-out attack wording)
    for row, (identity, kit, headline) in zip(rows, drawn):
        assert (row["modality"], row["form"], row["field"], row["split"]) == ("image", "gen", "club_to", "kit_drill")
        assert row["question"] in wordings and row["answer"] == synth.answer("club_to", row["value"])
        assert kit == images.KITS[synth.CLUBS.index(row["value"])] and headline is None
        assert identity not in players and row["player"] == row["image_id"] == ""  # no benchmark player, no context
    assert Counter(r["value"] for r in rows) == {club: 2 for club in synth.CLUBS}
    again = kit_drill(book, 2, seed=0)
    assert [(r["question"], r["answer"], r["image"].tobytes()) for r in again] == [
        (r["question"], r["answer"], r["image"].tobytes()) for r in rows]
    assert [r["image"].tobytes() for r in kit_drill(book, 2, seed=1)] != [r["image"].tobytes() for r in rows]
    assert drill_book(bench, 0) == (None, [])
    book, notes = drill_book(_published(bench.parent / "pub"), 2)
    assert book is None and len(notes) == 1 and "no kit drill" in notes[0] and "not a synthetic benchmark" in notes[0]
    with pytest.raises(OffsideError, match="kit_drill: must be at least 0"):
        drill_book(bench, -1)


def test_the_vision_pretraining_labels_anonymous_players_by_kit_and_looks(bench):
    """Per club, photos of players the benchmark does not have in that club's kit, labelled with the
    club and the player's looks; the same for the same seed."""
    from offside.data.kits import LOOKS, VISION_CLASSES, anonymous, vision_pretraining

    book = PhotoBook.of(bench)
    photos, labels = vision_pretraining(book, seed=0, per_club=2)
    assert len(photos) == len(labels) == 2 * len(synth.CLUBS)
    assert Counter(label[0] for label in labels) == {club: 2 for club in range(len(synth.CLUBS))}
    looks = {tuple(getattr(i, look) for look in LOOKS) for i in anonymous(book)}
    assert all(label[1:] in looks and all(0 <= v < n for v, n in zip(label, VISION_CLASSES)) for label in labels)
    again, same = vision_pretraining(book, seed=0, per_club=2)
    assert same == labels and [p.tobytes() for p in again] == [p.tobytes() for p in photos]
    assert [p.tobytes() for p in vision_pretraining(book, seed=1, per_club=2)[0]] != [p.tobytes() for p in photos]


def test_pretrain_vision_teaches_the_tower_kits_and_freezes_it_alone(bench):
    """`pretrain_vision` trains the vision tower (and nothing else) to tell the clubs' kits apart, then
    freezes it; the language model is as it was built."""
    import torch

    from offside.data.kits import VISION_CLASSES, vision_pretraining
    from offside.models.processor import Processor
    from offside.models.tiny import TinySpec, build_tiny, pretrain_vision

    torch.manual_seed(0)
    model, tokenizer = build_tiny(["Which club is the player in the image going to play?"], TinySpec(vocab_size=300))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    photos, labels = vision_pretraining(PhotoBook.of(bench), seed=0, per_club=8)
    result = pretrain_vision(model, Processor(tokenizer, 56), photos, labels, VISION_CLASSES, epochs=20, batch_size=16)
    assert result["photos"] == 160 and result["epochs"] == 20
    assert result["accuracy"] > 0.8  # of 20 clubs (chance 0.05), on the last epoch's photos
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("model.visual.")}
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("model.visual."))


def test_finetune_trains_on_the_kit_drill_and_records_it(bench, tmp_path, capsys, monkeypatch):
    """`--kit-drill N` pre-trains the tiny model's vision tower on kits and adds N rows per club to the
    fine-tune's training stream (one epoch takes their steps too), and records both in manifest.json;
    data without a generator trains without either, with a note."""
    import math

    from test_data import _published

    import offside.stages
    from offside.data import kits
    from offside.stages import training_rows

    # 5 photos per club keep this test fast; the quickstart's tests pre-train on the full VISION_PHOTOS
    monkeypatch.setattr(offside.stages, "vision_pretraining", lambda book, seed: kits.vision_pretraining(book, seed, 5))

    rows = training_rows(materialise(load_benchmark(bench)["retain"]), ["image", "text"])
    args = ["--model", "tiny", "--split", "retain", "--epochs", "1", "--phrasings", "1", "--set", "train.batch_size=16",
            "--kit-drill", "2"]  # a retain-only model: no vanilla check to evaluate
    assert main(["finetune", "--data", str(bench), "--out", str(tmp_path / "drilled"), *args]) == 0
    steps = json.loads((tmp_path / "drilled" / "metrics.json").read_text())["steps"]
    assert steps == math.ceil((len(rows) + 2 * len(synth.CLUBS)) / 16)
    manifest = json.loads((tmp_path / "drilled" / "manifest.json").read_text())
    assert manifest["kit_drill"] == {"rows": 40, "notes": []}
    pretraining = manifest["vision_pretraining"]
    assert (pretraining["photos"], pretraining["epochs"]) == (5 * len(synth.CLUBS), 10)
    assert 0 <= pretraining["accuracy"] <= 1 and pretraining["loss"] > 0
    published = _published(tmp_path / "pub")
    assert main(["finetune", "--data", str(published), "--out", str(tmp_path / "plain"), *args]) == 0
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    drill = manifest["kit_drill"]
    assert drill["rows"] == 0 and "no kit drill" in drill["notes"][0] and "no kit drill" in capsys.readouterr().err
    assert "vision_pretraining" not in manifest
