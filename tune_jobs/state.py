"""Sweep state that a full disk cannot wreck.

Tune writes its experiment state (`experiment_state-<session>.json`, the searcher's state, `tuner.pkl`)
into the sweep directory in place, and Ray Train its run's `checkpoint_manager_snapshot.json`: a disk
that fills mid-write leaves them truncated, and a truncated experiment state makes `Tuner.restore`
start the experiment afresh, forgetting trials and their settings. So each is also kept as its last
readable version, written atomically (temp file + rename) after each save: the experiment state in
`<sweep>/.last-good-state.zip` (callback `KeepGoodState`), a Train run's snapshot beside it as
`.checkpoint_manager_snapshot.good.json` (callback `KeepGoodSnapshot`). Before a sweep resumes
(`recover_experiment_state`) and before a trial's Train run restarts (`recover_snapshot`), an
unreadable file is moved aside and its last good version put back."""

from __future__ import annotations

import json
import os
import pickletools
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from offside.errors import OffsideError

GOOD_STATE = ".last-good-state.zip"
STATE_PATTERN = "experiment_state-*.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
GOOD_SNAPSHOT = ".checkpoint_manager_snapshot.good.json"


SESSION = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$")  # Tune's session string, ending a state file's name


def readable(path: Path) -> str | None:
    """None when `path` is whole: JSON that parses, or a pickle whose opcodes run to STOP (nothing is
    unpickled; Tune's `basic-variant-state-*.json` is a pickle despite its name); else why not, in one line."""
    try:
        data = path.read_bytes()
        if data[:1] == b"\x80":  # a pickle's protocol opcode
            for _ in pickletools.genops(data):
                pass
        else:
            json.loads(data)
        return None
    except Exception as err:  # truncated JSON or pickle: any decoding error
        return f"{type(err).__name__}: {err}".splitlines()[0]


def _session(path: Path) -> str:
    """The Tune session a state file belongs to (`<kind>-<session>.<ext>`); '' for `tuner.pkl`."""
    found = SESSION.search(path.stem)
    return found.group() if found else ""


def _tune_files(directory: Path) -> list[Path]:
    """Tune's state files in `directory`: those of a session, and `tuner.pkl`."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".pkl")
                  and (_session(p) or p.name == "tuner.pkl"))


def write_atomically(path: Path, data: bytes | str | Callable) -> None:
    """Writes `data` (or what `data(file)` writes) to a temporary file beside `path`, then renames it
    over `path`: a full disk leaves the old file whole, never a truncated one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def keep_experiment_state(staging: Path, sweep_dir: Path) -> bool:
    """Copies Tune's state files from its local staging directory (complete: Tune writes them there
    in the thread that runs callbacks) into the sweep's last good state, when they all parse; False
    when they do not or the copy failed (the previous good state stays)."""
    files = _tune_files(staging) + [p for p in (sweep_dir / "tuner.pkl",) if p.exists()]
    if not any(p.match(STATE_PATTERN) for p in files) or any(readable(p) for p in files):
        return False
    try:
        write_atomically(sweep_dir / GOOD_STATE, lambda f: _zip(f, files))
    except OSError:  # e.g. the disk is full: the last good state is the one before
        return False
    return True


def _zip(f, files: list[Path]) -> None:
    with zipfile.ZipFile(f, "w") as archive:
        for path in files:
            archive.write(path, path.name)


def recover_experiment_state(sweep_dir: Path) -> str | None:
    """Before `Tuner.restore`: when the newest experiment state (or a state file of its session)
    cannot be read, moves the unreadable session's files aside into `.unreadable-<time>/` and puts the
    last good state back. Returns a line saying what was done, or None when the state was readable."""
    states = sorted(sweep_dir.glob(STATE_PATTERN))
    if not states:
        return None
    session = _session(states[-1])
    broken = {p.name: why for p in _tune_files(sweep_dir) if _session(p) in (session, "") and (why := readable(p))}
    if not broken:
        return None
    good = sweep_dir / GOOD_STATE
    if not good.exists():
        raise OffsideError(f"{sweep_dir}: Tune's state cannot be read ({_describe(broken)}) and there is no last good "
                           f"state ({GOOD_STATE}) to fall back to")
    with zipfile.ZipFile(good) as archive:
        names = archive.namelist()
        good_session = max(_session(Path(n)) for n in names)
        aside = sweep_dir / f".unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in _tune_files(sweep_dir):
            if path.name in names or _session(path) > good_session:
                path.rename(aside / path.name)
        archive.extractall(sweep_dir)
    return (f"Tune's state could not be read ({_describe(broken)}); resumed from the last good state of session "
            f"{good_session} instead (the unreadable files are in {aside})")


def _describe(broken: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in sorted(broken.items()))


def keep_snapshot(run_dir: Path) -> None:
    """After Train registered a report: the run's checkpoint manager snapshot, when it parses, becomes
    its last good version."""
    snapshot = run_dir / SNAPSHOT
    if not snapshot.exists() or readable(snapshot):
        return
    data = snapshot.read_bytes()
    try:
        write_atomically(run_dir / GOOD_SNAPSHOT, data)
    except OSError:
        pass  # the disk is full: the previous good version stays


def recover_snapshot(run_dir: Path) -> list[str]:
    """Before a Train run restarts: an unreadable checkpoint manager snapshot is moved aside and its last
    good version put back (or, with none, the run starts from scratch); checkpoint directories that no
    snapshot names (an upload the disk cut short, never registered) are removed to give their space
    back. Returns a line for each thing done."""
    snapshot, done = run_dir / SNAPSHOT, []
    why = readable(snapshot) if snapshot.exists() else None
    if why:
        snapshot.rename(run_dir / f".{SNAPSHOT}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        good = run_dir / GOOD_SNAPSHOT
        if good.exists() and readable(good) is None:
            write_atomically(snapshot, good.read_bytes())
            done.append(f"{snapshot}: unreadable ({why}); restored its last good version")
        else:
            done.append(f"{snapshot}: unreadable ({why}) and no good version kept; the trial starts from scratch")
    named = _checkpoint_names(json.loads(snapshot.read_text())) if snapshot.exists() else set()
    for partial in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name not in named):
        shutil.rmtree(partial)
        done.append(f"{partial}: never registered (its upload was cut short); removed")
    return done


def _checkpoint_names(doc) -> set[str]:
    """Every `checkpoint_dir_name` in a checkpoint manager snapshot."""
    if isinstance(doc, dict):
        own = {doc["checkpoint_dir_name"]} if isinstance(doc.get("checkpoint_dir_name"), str) else set()
        return own.union(*(_checkpoint_names(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(_checkpoint_names(v) for v in doc))
    return set()


def saved_statuses(trials: list) -> list[str]:
    """The trials' statuses in the experiment state Tune saved last (in its local staging directory)."""
    if not trials:
        return []
    staging = Path(trials[0].storage.experiment_driver_staging_path)
    state = max(staging.glob(STATE_PATTERN), default=None)
    if state is None:
        return [t.status for t in trials]
    return [json.loads(trial)["status"] for trial, _ in json.loads(state.read_text())["trial_data"]]


def keep_state_callback():
    """The Tune callback keeping the sweep's last good experiment state (ray imported here). It finds
    the sweep directory through the trials (Tune points them at a moved sweep's new place), so the
    callback, pickled with the sweep, holds no path."""
    from ray.tune import Callback

    class KeepGoodState(Callback):
        def __init__(self):
            self.saved: int | None = None

        def on_step_end(self, iteration, trials, **info):
            if not trials:
                return
            staging = Path(trials[0].storage.experiment_driver_staging_path)
            state = max(staging.glob(STATE_PATTERN), default=None)
            stamp = state.stat().st_mtime_ns if state else None
            sweep_dir = Path(trials[0].storage.experiment_fs_path)
            if stamp and stamp != self.saved and keep_experiment_state(staging, sweep_dir):
                self.saved = stamp

        def on_experiment_end(self, trials, **info):
            self.on_step_end(0, trials)

    return KeepGoodState()


def snapshot_callback(run_dir: Path):
    """The Ray Train callback keeping a run's last good checkpoint manager snapshot: report callbacks
    run after Train's checkpoint manager has written the snapshot."""
    from ray.train import UserCallback

    class KeepGoodSnapshot(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            keep_snapshot(run_dir)

    return KeepGoodSnapshot()
