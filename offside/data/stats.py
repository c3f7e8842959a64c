"""Row counts of a loaded benchmark, for `offside data stats DIR --json`."""

from __future__ import annotations

from collections import Counter

import datasets

from offside.data.schema import FORMS, KINDS, MODALITIES

ALL = "all"


def stats(ds: datasets.DatasetDict) -> dict:
    """counts[split][modality][form][kind] as plain ints; "all" at every level sums that level
    (so counts["all"]["all"]["all"]["all"] is the total); kinds are shared, private, unknown."""
    kinds = (*KINDS, "unknown")
    out: dict = {}
    for split in (*ds, ALL):
        out[split] = {m: {f: {k: 0 for k in (*kinds, ALL)} for f in (*FORMS, ALL)}
                      for m in (*MODALITIES, ALL)}
    for split, d in ds.items():
        counts = Counter(zip(d["modality"], d["form"], d["kind"]))
        for (m, f, k), n in counts.items():
            for s_ in (split, ALL):
                for m_ in (m, ALL):
                    for f_ in (f, ALL):
                        for k_ in (k, ALL):
                            out[s_][m_][f_][k_] += n
    return out
