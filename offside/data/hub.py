"""Import the published OFFSIDE data from the Hugging Face Hub (a dataset repository)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from offside.errors import OffsideError

_TRUE = {"1", "true", "yes", "on"}


def import_from_hub(repo_id: str, out_dir: str | os.PathLike, revision: str | None = None) -> Path:
    """Download dataset repo `repo_id` into out_dir (must not exist or be empty), validate it with
    `load_benchmark`, and return the benchmark directory (out_dir, or the folder inside it that holds
    forget_set.json). Nothing is left in out_dir when the download or the validation fails."""
    from offside.data.loader import load_benchmark

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffsideError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise OffsideError(f"cannot import {repo_id!r} from the Hugging Face Hub: HF_HUB_OFFLINE is "
                           "set (offline mode); copy the data into a directory and load that instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            from huggingface_hub import snapshot_download
            snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=tmp)
        except Exception as e:  # hub errors, connection errors, missing package: one clear message
            raise OffsideError(f"cannot download dataset {repo_id!r}"
                               f"{f' at revision {revision!r}' if revision else ''} from the Hugging "
                               f"Face Hub: {type(e).__name__}: {e}") from e
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        found = sorted(p.parent for p in tmp.rglob("forget_set.json"))
        if not found:
            raise OffsideError(f"dataset {repo_id!r} has no forget_set.json; not an OFFSIDE benchmark")
        rel = found[0].relative_to(tmp)
        load_benchmark(found[0])
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / rel
