"""File utilities every layer may use: a stage's output directory is checked before any work and
written atomically (built under a hidden temp name, renamed when complete)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from offside.errors import OffsideError


@contextmanager
def atomic_dir(out: Path):
    """Yields a hidden temp directory beside `out`, renamed to `out` when the block succeeds and
    removed when it fails, so a reader never sees a half-written run."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out(out: str | os.PathLike) -> Path:
    """Fails before any work if the stage's output directory is missing or already used."""
    if not out:
        raise OffsideError("an output directory is required (--out)")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OffsideError(f"{path}: already exists; a stage never overwrites another run's directory")
    return path


def atomic_write(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temp file and a rename: a reader sees the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
