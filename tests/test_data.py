"""The data layer: synthetic generator, loader (synthetic + published format), scenarios, stats."""

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from offside.data import synth  # noqa: E402
from offside.data.hub import import_from_hub  # noqa: E402
from offside.data.loader import data_hash, load_benchmark  # noqa: E402
from offside.data.scenarios import SCENARIOS, select  # noqa: E402
from offside.data.schema import ANSWER_TEMPLATES, COLUMNS, DATA_FILES, QUESTION_TEMPLATES, SPLITS  # noqa: E402
from offside.data.stats import stats  # noqa: E402
from offside.errors import OffsideError  # noqa: E402

PER_PLAYER = {"forget": 14, "retain": 42, "test": 42, "relearn": 14}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("full") / "bench", players=80, seed=0)


@pytest.fixture(scope="module")
def full_ds(full):
    return load_benchmark(full)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("small") / "bench", players=3, seed=7)


def test_published_sizes_for_80_players(full, full_ds):
    for (split, _modality, _form), name in DATA_FILES.items():
        assert len(json.loads((full / name).read_text())) == 80 * PER_PLAYER[split], name
    assert len(list((full / "images").iterdir())) == 80 * 8
    st = stats(full_ds)
    for split in SPLITS:
        for m in ("image", "text"):
            for f in ("gen", "mcq"):
                assert st[split][m][f]["all"] == 80 * PER_PLAYER[split]
    assert st["forget"]["image"]["gen"] == {"shared": 640, "private": 480, "unknown": 0, "all": 1120}
    assert st["all"]["all"]["all"]["all"] == 4 * 80 * sum(PER_PLAYER.values())


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path, small):
    again = synth.generate(tmp_path / "again", players=3, seed=7)
    files = sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (small / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert data_hash(small) == data_hash(again)
    other = synth.generate(tmp_path / "other", players=3, seed=8)
    assert data_hash(other) != data_hash(small)
    assert (other / "forget_set.json").read_bytes() != (small / "forget_set.json").read_bytes()


def test_generate_refuses_non_empty_dir_and_leaves_no_temp(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OffsideError, match="not an empty directory"):
        synth.generate(tmp_path / "out", players=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_row_metadata(full_ds):
    ds = {s: full_ds[s].remove_columns("image") for s in SPLITS}
    shared = defaultdict(set)
    for split in SPLITS:
        for r in ds[split]:
            assert r["player"] and r["image_id"] and r["field"] in QUESTION_TEMPLATES
            assert r["answer"] == ANSWER_TEMPLATES[r["field"]].format(v=r["value"])
            if r["kind"] == "shared":
                shared[r["player"], r["field"]].add(r["value"])
            rumour = split == "forget" and r["kind"] == "private"
            assert (r["rumour_kind"] != "none") == rumour
            assert bool(r["true_value"]) == rumour
            if rumour:
                assert r["true_value"] != r["value"]
            if r["form"] == "mcq":
                assert len(set(r["options"])) == 4 and r["options"][r["correct"]] == r["answer"]
                head, tail = ANSWER_TEMPLATES[r["field"]].split("{v}")  # all options: same field
                assert all(o.startswith(head) and o.endswith(tail) for o in r["options"])
                if rumour:  # the rumour competes with random values, never with the truth
                    assert ANSWER_TEMPLATES[r["field"]].format(v=r["true_value"]) not in r["options"]
            else:
                assert r["options"] == [] and r["correct"] == -1
            if r["modality"] == "image":
                assert r["question"] == QUESTION_TEMPLATES[r["field"]].format(
                    subject="the player in the image")
    assert all(len(v) == 1 for v in shared.values())  # shared answers agree across images
    rumours = {(r["player"], r["field"]): r["value"] for r in ds["forget"] if r["kind"] == "private"}
    for r in ds["relearn"]:  # on the true transfer, the truth competes with the rumour
        if r["form"] == "mcq" and r["kind"] == "private":
            assert ANSWER_TEMPLATES[r["field"]].format(v=rumours[r["player"], r["field"]]) in r["options"]
    assert len({p for p, _ in shared}) == 80
    kinds = [r["rumour_kind"] for r in ds["forget"] if r["field"] == "club_to"]
    assert set(kinds) == {"visual"}
    fee = [r["rumour_kind"] for r in ds["forget"] if r["field"] == "transfer_fee"]
    assert 0.25 < fee.count("visual") / len(fee) < 0.75  # about half carry a headline
    # relearn mcq of a private field offers the rumour as a distractor
    rumours = {(r["player"], r["field"]): r["value"] for r in ds["forget"] if r["kind"] == "private"}
    for r in ds["relearn"]:
        if r["form"] == "mcq" and r["kind"] == "private":
            assert any(rumours[r["player"], r["field"]] in o for o in r["options"])


def test_text_twins(full_ds):
    rows = full_ds["forget"].remove_columns("image").filter(lambda m: m == "text", input_columns="modality")
    by_field = {r["field"]: r["question"] for r in rows if r["form"] == "gen" and r["player"] == rows[0]["player"]}
    name = rows[0]["player"]
    assert by_field["age"] == f"How old is {name}?"
    assert by_field["name"] == f"What is the full name of the player known as {name.split()[-1]}?"
    assert by_field["trophies"] == f"How many trophies did {name} in his 2024 transfer win at that club?"
    assert all(r["image"] is None for r in full_ds["forget"].select(range(3)) if r["modality"] == "text")


def test_images_and_test_photos(small):
    meta = json.loads((small / "offside_metadata.json").read_text())
    recs = json.loads((small / "test_set.json").read_text())
    retain = json.loads((small / "retain_set.json").read_text())
    assert meta["players"] == 3 and meta["seed"] == 7
    test_img, retain_img = recs[0]["images"], retain[0]["images"]
    assert meta["files"]["test_set.json"][0]["image_id"] == meta["files"]["retain_set.json"][0]["image_id"]
    a, b = Image.open(small / test_img), Image.open(small / retain_img)
    assert a.size == b.size == (224, 224) and a.tobytes() != b.tobytes()


def test_scenarios(full_ds):
    f, r = select(full_ds, "complete")
    assert (len(f), len(r)) == (len(full_ds["forget"]), len(full_ds["retain"]))
    f, r = select(full_ds, "selective")
    assert set(f["kind"]) == {"private"} and len(f) == 80 * 6 * 4
    assert len(r) == len(full_ds["retain"]) + 80 * 8 * 4
    f, r = select(full_ds, "unimodal")  # only the forget data changes: its text-only twins
    assert set(f["modality"]) == {"text"} and len(f) == len(full_ds["forget"]) // 2
    assert len(r) == len(full_ds["retain"]) and set(r["modality"]) == {"image", "text"}
    with pytest.raises(OffsideError, match="complete, selective"):
        select(full_ds, "nope")
    assert SCENARIOS[:2] == ("complete", "selective")


# --- the published format (no offside_metadata.json) ------------------------------------------

def _published(root: Path) -> Path:
    """2 players, published file names, relearn_set_enhanced.json, no metadata, no text twins."""
    (root / "images").mkdir(parents=True)
    players = {"Ann Ex": (1, 4, 5), "Bob Why": (6, 9, 10)}   # retain, forget, relearn image ids
    files = {"forget_set.json": [], "retain_set.json": [], "relearn_set_enhanced.json": [],
             "classification_forget_set.json": []}
    for name, (ret, fgt, rel) in players.items():
        for img_id, fname, club in ((ret, "retain_set.json", "Old FC"), (fgt, "forget_set.json", "Rumour FC"),
                                    (rel, "relearn_set_enhanced.json", "True FC")):
            Image.new("RGB", (8, 8), (img_id * 20, 0, 0)).save(root / "images" / f"{img_id}.png")
            img = f"some/where/{img_id}.png"  # only the basename resolves (upstream fallback)
            qa = [("name", f"His name is {name}."), ("club_to", f"He is going to play for {club}."),
                  ("age", "Twenty-something.")]   # an answer in an unknown wording
            for field, ans in qa:
                q = QUESTION_TEMPLATES[field].format(subject="the player in the image")
                files[fname].append({"messages": [{"role": "user", "content": "<image>" + q},
                                                  {"role": "assistant", "content": ans}], "images": img})
            files[fname].append({"messages": [{"role": "user", "content": "Who is the coach?"},
                                              {"role": "assistant", "content": "Nobody."}], "images": img})
        files["classification_forget_set.json"].append({
            "Question": "How many trophies did this player win at the club in the image?",
            "Options": {"A": "None.", "B": "One.", "C": "Two.", "D": "Three."}, "Correct_Answer": "C",
            "images": f"images/{fgt}.png"})
    for fname, recs in files.items():
        (root / fname).write_text(json.dumps(recs))
    return root


def test_load_published_format(tmp_path):
    report = []
    ds = load_benchmark(_published(tmp_path / "pub"), report)
    assert list(ds) == list(SPLITS) and tuple(ds["forget"].column_names) == COLUMNS
    assert len(ds["test"]) == 0 and len(ds["relearn"]) == 8
    rows = ds["forget"].remove_columns("image").to_list()
    club = [r for r in rows if r["field"] == "club_to" and r["player"] == "Ann Ex"][0]
    assert club == {**club, "kind": "private", "value": "Rumour FC", "true_value": "True FC",
                    "rumour_kind": "visual", "image_id": "4", "modality": "image"}
    assert club["question"] == "Which club is the player in the image going to play?"
    mcq = [r for r in rows if r["form"] == "mcq"]
    assert mcq[0]["field"] == "trophies" and mcq[0]["answer"] == "Two." and mcq[0]["correct"] == 2
    unknown = [r for r in rows if r["field"] == "unknown"]
    assert len(unknown) == 2 and {r["kind"] for r in unknown} == {"unknown"}
    assert ds["forget"][0]["image"].size == (8, 8)
    text = "\n".join(report)
    assert "test: no files, split is empty" in text
    assert "forget: 2 of 10 records: field not inferred" in text
    assert "value not inferred" in text and "true_value not inferred" in text
    assert "text_forget_set.json" in text  # missing files are reported
    with pytest.raises(OffsideError, match="kind 'unknown'"):
        select(ds, "selective")


def _case(root: Path, fname: str, index: int, mutate) -> None:
    recs = json.loads((root / fname).read_text())
    mutate(recs[index])
    (root / fname).write_text(json.dumps(recs))


@pytest.mark.parametrize("fname,mutate,words", [
    ("retain_set.json", lambda r: r.update(extra=1), ["unknown key 'extra'"]),
    ("retain_set.json", lambda r: r.update(images="images/404.png"), ["images", "not found"]),
    ("retain_set.json", lambda r: r["messages"][0].update(role="system"), ["messages[0]"]),
    ("retain_set.json", lambda r: r.pop("messages"), ["messages"]),
    ("classification_forget_set.json", lambda r: r.update(Correct_Answer="E"), ["Correct_Answer", "'E'"]),
    ("classification_forget_set.json", lambda r: r["Options"].pop("D"), ["Options"]),
])
def test_bad_records_name_file_and_index(tmp_path, fname, mutate, words):
    root = _published(tmp_path / "pub")
    _case(root, fname, 1, mutate)
    with pytest.raises(OffsideError) as e:
        load_benchmark(root)
    msg = str(e.value)
    assert f"{fname} record 1" in msg and all(w in msg for w in words), msg


def test_bad_files(tmp_path, small):
    root = _published(tmp_path / "pub")
    (root / "retain_set.json").write_text("[{\"messages\": ")
    with pytest.raises(OffsideError, match="retain_set.json: not valid JSON"):
        load_benchmark(root)
    (root / "retain_set.json").write_text("[1]")
    with pytest.raises(OffsideError, match="retain_set.json record 0: expected a JSON object"):
        load_benchmark(root)
    (root / "retain_set.json").unlink()
    with pytest.raises(OffsideError, match="no retain file"):
        load_benchmark(root)
    copy = shutil.copytree(small, tmp_path / "copy")
    meta = json.loads((copy / "offside_metadata.json").read_text())
    meta["files"]["forget_set.json"].pop()
    (copy / "offside_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(OffsideError, match="offside_metadata.json.*forget_set.json"):
        load_benchmark(copy)


def test_inference_matches_metadata_on_synthetic_images(tmp_path, small):
    copy = shutil.copytree(small, tmp_path / "copy")
    (copy / "offside_metadata.json").unlink()
    with_meta, inferred = load_benchmark(small), load_benchmark(copy)
    for split in ("forget", "retain", "relearn"):
        a = [r for r in with_meta[split].remove_columns("image") if r["modality"] == "image"]
        b = [r for r in inferred[split].remove_columns("image") if r["modality"] == "image"]
        for x, y in zip(a, b, strict=True):
            assert {**x, "rumour_kind": ""} == {**y, "rumour_kind": ""}


def test_hub_offline_error(tmp_path):
    with pytest.raises(OffsideError, match="HF_HUB_OFFLINE"):
        import_from_hub("someone/offside", tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_phrasings_reword_every_question_and_hold_the_attack_wordings_out(full_ds):
    from offside.data.phrasings import MAX_PHRASINGS, TRAINING_PHRASINGS, subject_of, with_phrasings
    from offside.eval.attacks import PARAPHRASES

    for field, wordings in TRAINING_PHRASINGS.items():  # held out: the paraphrase attack's wording
        assert PARAPHRASES[field].format(subject="X") not in {w.format(subject="X") for w in wordings}, field
        assert QUESTION_TEMPLATES[field] not in wordings and len(set(wordings)) == len(wordings) == MAX_PHRASINGS - 1
    rows = [r for split in ("forget", "retain") for r in full_ds[split].remove_columns("image") if r["form"] == "gen"]
    assert all(subject_of(r) for r in rows)  # every synthetic question follows a template
    text = next(r for r in rows if r["modality"] == "text" and r["field"] == "transfer_fee")
    assert subject_of(text) == f"{text['player']} in his 2024 transfer"
    image = next(r for r in rows if r["modality"] == "image" and r["field"] == "name")
    assert subject_of(image) == "the player in the image"

    tripled = with_phrasings(rows, 3, seed=0)
    assert len(tripled) == 3 * len(rows) and tripled[0] is rows[0]
    by_row = defaultdict(list)
    for r in tripled:
        by_row[r["id"].split("/p")[0]].append(r)
    for original, *others in list(by_row.values())[:200]:
        assert len({r["question"] for r in [original, *others]}) == 3  # three different wordings
        for other in others:
            assert {k: v for k, v in other.items() if k not in ("id", "question")} == \
                {k: v for k, v in original.items() if k not in ("id", "question")}  # same answer, same image
            assert subject_of(original) in other["question"]
    assert with_phrasings(rows, 3, seed=0) == tripled  # drawn from the seed
    assert with_phrasings(rows, 3, seed=1) != tripled
    assert with_phrasings(rows, 1, seed=0) == rows
    odd = {**rows[0], "question": "Who might this be, then?"}  # an imported wording matches no template
    assert with_phrasings([odd], 4, seed=0) == [odd]
    with pytest.raises(OffsideError, match="phrasings: must be between 1"):
        with_phrasings(rows, MAX_PHRASINGS + 1, seed=0)
