"""What a run's manifest records about where it came from: the code's git commit and the model
(path, hub revision, content hash). No torch here: `offside submit` reads the git commit too."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

GIT_SHA_ENV = "OFFSIDE_GIT_SHA"  # set by `offside submit`: a job's uploaded working dir has no .git
MODEL_FILES = ("*.safetensors", "*.json", "*.model", "*.txt")  # weights, configs, tokenizer


def git_sha() -> str:
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def model_provenance(name: str) -> dict:
    """{model_path, model_revision, model_sha256} of a model directory, adapter directory or hub id.
    The hash covers the directory's weights, configs and tokenizer files (names and bytes); an
    adapter's hash is of the adapter alone, and its base has its own manifest. `tiny` (built from
    scratch) has none of these."""
    if name == "tiny":
        return {"model_path": "tiny", "model_revision": None, "model_sha256": None}
    path, revision = Path(name), None
    if not path.exists():  # a hub id: the snapshot in the local cache, whose directory name is the commit
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, local_files_only=True))
        revision = path.name
    return {"model_path": str(path.resolve()) if revision is None else name, "model_revision": revision,
            "model_sha256": directory_sha256(path)}


def directory_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted({f for pattern in MODEL_FILES for f in path.glob(pattern) if f.is_file()})
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
