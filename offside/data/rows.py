"""Plain Python rows from a benchmark split, with each image file decoded once (many rows share one
image: 14 questions × 2 forms per picture)."""

from __future__ import annotations

import io

import datasets
from PIL import Image


def materialise(split: datasets.Dataset) -> list[dict]:
    raw = split.cast_column("image", datasets.Image(decode=False)) if "image" in split.column_names else split
    cache: dict[str, Image.Image] = {}
    rows = []
    for row in raw:
        image = row.get("image")
        if image is not None:
            key = image.get("path") or str(hash(image["bytes"]))
            if key not in cache:
                source = image["path"] if image.get("bytes") is None else io.BytesIO(image["bytes"])
                cache[key] = Image.open(source).convert("RGB")
            row = {**row, "image": cache[key]}
        rows.append(row)
    return rows
