"""Subject-level train / val / test splits: a subject's scans never straddle splits.

Subjects are shuffled with a seeded RNG within strata (dataset, and diagnosis when present) and dealt out by
the configured fractions, so every split sees every dataset and diagnosis group in proportion.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def assign_splits(scans: pd.DataFrame, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> pd.Series:
    """Split name per row of `scans` (needs `dataset`, `subject`; uses `diagnosis` when present)."""
    subjects = scans.drop_duplicates("subject")[["subject", "dataset"]].copy()
    if "diagnosis" in scans:
        first_dx = scans.groupby("subject")["diagnosis"].first()
        subjects["stratum"] = subjects["dataset"] + "|" + subjects["subject"].map(first_dx).fillna("n/a").astype(str)
    else:
        subjects["stratum"] = subjects["dataset"]
    # order subjects by a seeded hash rather than by input order, so adding scans never reshuffles others
    salt = str(seed).encode()
    subjects["rank"] = [hashlib.blake2b(s.encode(), key=salt.ljust(8, b"_"), digest_size=8).hexdigest()
                        for s in subjects["subject"]]
    cuts = np.cumsum(fractions)
    split_of: dict[str, str] = {}
    for _, group in subjects.sort_values("rank").groupby("stratum", sort=True):
        n = len(group)
        position = (np.arange(n) + 0.5) / n
        for subject, pos in zip(group["subject"], position):
            split_of[subject] = SPLITS[int(np.searchsorted(cuts, pos * cuts[-1]))]
    return scans["subject"].map(split_of)
