"""Load an OFFSIDE directory (synthetic or published) into a `datasets.DatasetDict`.

One loader for both. It reads, per split, the files of `schema.DATA_FILES` that exist
(`relearn_set_enhanced.json` is accepted for `relearn_set.json`); forget and retain must have at
least one file, test and relearn may be missing (empty split, reported). Row metadata comes from
`offside_metadata.json` when present (synthetic benchmarks); otherwise it is inferred:
modality from the presence of "images"; field/kind by matching the question against the question
templates; image_id = image file stem; player = the answer to the "name" question on the same image;
value = the answer parsed with `schema.ANSWER_TEMPLATES`; true_value of forget private rows = the
relearn value of the same player and field; rumour_kind by field (club_to visual, other private
textual). What cannot be inferred is left "unknown"/"" and reported: pass a list as `report` to
receive human-readable lines. Bad input raises OffsideError naming file, record index and field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import datasets

from offside.data.schema import (
    ANSWER_TEMPLATES, COLUMNS, DATA_FILES, FIELDS, FILE_ALIASES, IMAGE_SUBJECT, METADATA_FILE,
    METADATA_KEYS, OPTION_LETTERS, QUESTION_ALIASES, QUESTION_TEMPLATES, REQUIRED_SPLITS, SPLITS,
    TEXT_QUESTION_TEMPLATES, field_kind, split_files,
)
from offside.errors import OffsideError

FEATURES = datasets.Features({
    c: datasets.List(datasets.Value("string")) if c == "options"
    else datasets.Value("int32") if c == "correct"
    else datasets.Image() if c == "image"
    else datasets.Value("string")
    for c in COLUMNS
})
GEN_KEYS = {"messages", "images"}
MCQ_KEYS = {"Question", "Options", "Correct_Answer", "images"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def _pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition("{subject}" if "{subject}" in template else "{v}")
    return re.compile(re.escape(head) + "(.+?)" + re.escape(tail) + r"\Z")


_QUESTIONS = [(f, _pattern(t)) for f in FIELDS for t in (QUESTION_TEMPLATES[f], TEXT_QUESTION_TEMPLATES[f])]
_ALIASES = {q: f for f, qs in QUESTION_ALIASES.items() for q in qs}
_ANSWERS = {f: _pattern(t) for f, t in ANSWER_TEMPLATES.items()}


def match_question(question: str) -> tuple[str, str]:
    """(field, subject) of a question in any known wording, or ("unknown", "")."""
    if question in _ALIASES:
        return _ALIASES[question], IMAGE_SUBJECT
    for f, pat in _QUESTIONS:
        m = pat.match(question)
        if m:
            return f, m.group(1)
    return "unknown", ""


def parse_value(field: str, answer: str) -> str:
    m = _ANSWERS[field].match(answer) if field in _ANSWERS else None
    return m.group(1) if m else ""


def _read_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OffsideError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise OffsideError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _image(rec: dict, where: str, data_dir: Path) -> str | None:
    img = rec.get("images")
    if img is None:
        return None
    if isinstance(img, list) and len(img) == 1:
        img = img[0]
    if not isinstance(img, str) or not img:
        raise OffsideError(f"{where}: field 'images': expected a relative image path, got {img!r}")
    for cand in (data_dir / img, data_dir / "images" / Path(img).name):
        if cand.is_file():
            return str(cand.resolve())
    raise OffsideError(f"{where}: field 'images': image file not found: {img} (looked in {data_dir}"
                       f" and {data_dir / 'images'})")


def _parse(rec, where: str, form: str, data_dir: Path) -> dict:
    """Validate one published-format record; return question/answer/options/correct/image."""
    if not isinstance(rec, dict):
        raise OffsideError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    allowed = GEN_KEYS if form == "gen" else MCQ_KEYS
    for key in rec:
        if key not in allowed:
            raise OffsideError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    if form == "gen":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or len(msgs) != 2:
            raise OffsideError(f"{where}: field 'messages': expected a list of 2 messages (user, assistant)")
        for k, (msg, role) in enumerate(zip(msgs, ("user", "assistant"))):
            if not isinstance(msg, dict) or msg.get("role") != role or not isinstance(msg.get("content"), str):
                raise OffsideError(f"{where}: field 'messages[{k}]': expected "
                                   f'{{"role": "{role}", "content": <text>}}, got {msg!r}')
        q, a, options, correct = msgs[0]["content"], msgs[1]["content"], [], -1
    else:
        q, opts, letter = rec.get("Question"), rec.get("Options"), rec.get("Correct_Answer")
        if not isinstance(q, str):
            raise OffsideError(f"{where}: field 'Question': missing or not a string")
        if not isinstance(opts, dict) or sorted(opts) != list(OPTION_LETTERS) or not all(
                isinstance(v, str) for v in opts.values()):
            raise OffsideError(f"{where}: field 'Options': expected an object with text options A, B, C, D")
        if letter not in OPTION_LETTERS:
            raise OffsideError(f"{where}: field 'Correct_Answer': {letter!r} is not one of A, B, C, D")
        options = [opts[L] for L in OPTION_LETTERS]
        correct = OPTION_LETTERS.index(letter)
        a = options[correct]
    return {"question": q.replace("<image>", "").strip(), "answer": a, "options": options,
            "correct": correct, "image": _image(rec, where, data_dir)}


def _metadata(data_dir: Path) -> dict | None:
    path = data_dir / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OffsideError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise OffsideError(f"{path}: expected an object with a 'files' object")
    return meta["files"]


def load_benchmark(data_dir: str | os.PathLike, report: list[str] | None = None) -> datasets.DatasetDict:
    """Load a benchmark directory; lines about what is missing or not inferred go to `report`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise OffsideError(f"{data_dir}: benchmark directory not found")
    meta = _metadata(data_dir)
    notes: list[str] = []
    rows: dict[str, list[dict]] = {}
    for split in SPLITS:
        files = split_files(data_dir, split)
        if not files:
            if split in REQUIRED_SPLITS:
                raise OffsideError(f"{data_dir}: no {split} file (expected {DATA_FILES[split, 'image', 'gen']})")
            notes.append(f"{split}: no files, split is empty")
        missing = [n for (s, _, _), n in DATA_FILES.items() if s == split
                   and not any(p.name in (n, *FILE_ALIASES.get(n, ())) for p, _ in files)]
        if files and missing:
            notes.append(f"{split}: not present: {', '.join(missing)}")
        rows[split] = []
        for path, form in files:
            recs = _read_list(path)
            entries = None
            if meta is not None:
                entries = meta.get(path.name)
                if not isinstance(entries, list) or len(entries) != len(recs):
                    raise OffsideError(f"{data_dir / METADATA_FILE}: files[{path.name!r}]: expected "
                                       f"{len(recs)} entries (one per record of {path.name})")
            for i, rec in enumerate(recs):
                where = f"{path.name} record {i}"
                row = _parse(rec, where, form, data_dir)
                row |= {"split": split, "form": form, "_src": (path.name, i),
                        "modality": "image" if row["image"] else "text"}
                if entries is not None:
                    e = entries[i]
                    if not isinstance(e, dict) or any(not isinstance(e.get(k), str) for k in METADATA_KEYS):
                        raise OffsideError(f"{data_dir / METADATA_FILE}: files[{path.name!r}][{i}]: "
                                           f"expected string fields {', '.join(METADATA_KEYS)}")
                    row |= {k: e[k] for k in METADATA_KEYS}
                rows[split].append(row)
    if meta is None:
        _infer(rows, notes)
    if report is not None:
        report.extend(notes)
    return datasets.DatasetDict({split: _dataset(split, rows[split]) for split in SPLITS})


def _infer(rows: dict[str, list[dict]], notes: list[str]) -> None:
    """Fill metadata columns of rows read without offside_metadata.json; note what stays unknown."""
    names: dict[str, str] = {}  # image path -> player
    for split_rows in rows.values():
        for r in split_rows:
            r["field"], r["_subject"] = match_question(r["question"])
            r["kind"] = field_kind(r["field"])
            r["value"] = parse_value(r["field"], r["answer"])
            if r["field"] == "name" and r["image"]:
                names[r["image"]] = r["value"] or r["answer"].strip()
    # text rows name the player: "<name>", "<name> in his <season> transfer", or (name question)
    # the surname alone
    known = {n: n for n in names.values()}
    surnames = Counter(n.rsplit(" ", 1)[-1] for n in known)
    known |= {n.rsplit(" ", 1)[-1]: n for n in names.values() if surnames[n.rsplit(" ", 1)[-1]] == 1}
    for split_rows in rows.values():
        for r in split_rows:
            subject = re.sub(r" in his \d{4} transfer\Z", "", r["_subject"])
            r["player"] = names.get(r["image"], "") if r["image"] else known.get(subject, "")
    truth = {(r["player"], r["field"]): r["value"] for r in rows["relearn"]
             if r["kind"] == "private" and r["player"] and r["value"]}
    for split, split_rows in rows.items():
        missing: Counter = Counter()
        for r in split_rows:
            r["image_id"] = Path(r["image"]).stem if r["image"] else ""
            r["true_value"] = ""
            r["rumour_kind"] = "none"
            if split == "forget" and r["kind"] == "private":
                r["rumour_kind"] = "visual" if r["field"] == "club_to" else "textual"
                r["true_value"] = truth.get((r["player"], r["field"]), "") if r["player"] else ""
                missing["true_value not inferred"] += not r["true_value"]
            missing["field not inferred"] += r["field"] == "unknown"
            missing["value not inferred"] += r["field"] != "unknown" and not r["value"]
            missing["player not inferred"] += not r["player"]
            missing["image_id not inferred (text-only)"] += not r["image"]
        notes.extend(f"{split}: {n} of {len(split_rows)} records: {what}"
                     for what, n in missing.items() if n)
        if split == "forget" and split_rows:
            notes.append("forget: rumour_kind inferred from the field (club_to visual, other private "
                         "fields textual); headline rumours are not detected")


_FIELD_ORDER = {f: i for i, f in enumerate(FIELDS)}


def _dataset(split: str, rows: list[dict]) -> datasets.Dataset:
    rows.sort(key=lambda r: (r["modality"], r["form"], r["player"], r["image_id"],
                             _FIELD_ORDER.get(r["field"], len(FIELDS)), r["_src"]))
    counter: Counter = Counter()
    for r in rows:
        n = counter[r["modality"], r["form"]]
        counter[r["modality"], r["form"]] += 1
        r["id"] = f"{split}/{r['modality']}/{r['form']}/{n:05d}"
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=FEATURES)


def data_hash(data_dir: str | os.PathLike) -> str:
    """sha256 over all JSON and image files (relative path + bytes) in sorted path order."""
    root = Path(data_dir)
    h = hashlib.sha256()
    paths = sorted(p for p in root.rglob("*") if p.is_file()
                   and (p.suffix.lower() == ".json" or p.suffix.lower() in IMAGE_SUFFIXES))
    for p in paths:
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()
