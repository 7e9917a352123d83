"""The percentile bootstrap over SUBJECTS that every interval of the project uses (`evaluation.metrics` for the task
figures, `llm_train.evaluate` for caption fidelity against its control).

A subject may have several scans: what is resampled is the array of subject indices, and the statistic gathers every
scan of each drawn subject, so a subject's scans move together and a cohort scanned twice is not counted as twice
the evidence (`scipy.stats.bootstrap`, 1000 resamples, seeded). Percentile rather than BCa: BCa's acceleration needs
a jackknife over subjects, and it is undefined (NaN) when every resample gives the same figure, which is exactly the
perfect classifier (its AUC interval must read [1, 1]).

Subjects may be split into strata resampled separately (classification: a subject is in stratum 1 if any of its
scans is class 1, so every resample holds both classes). A stratum of a single subject cannot vary and is kept as it
is in every resample; with fewer than two subjects in every stratum nothing is resampled and no interval is given.
A figure undefined in some resamples gets its interval from the resamples where it is defined and the count of the
others is returned; defined in fewer than half of them (or undefined on the data itself), it gets none.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 1000
METHOD = "percentile"
MIN_DEFINED = 0.5  # share of resamples a figure must be defined in to get an interval


@dataclass
class Subjects:
    """Scans grouped by subject: `order` lists scan indices subject by subject; subject i's scans are
    order[starts[i]: starts[i] + counts[i]]; `strata` are the subject indices resampled separately."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    strata: list[np.ndarray]

    def scans(self, subjects: np.ndarray) -> np.ndarray:
        """The scan indices of the drawn subjects (a subject drawn twice brings its scans twice)."""
        subjects = np.asarray(subjects, int)
        lengths = self.counts[subjects]
        first = np.repeat(self.starts[subjects] - (np.cumsum(lengths) - lengths), lengths)
        return self.order[first + np.arange(int(lengths.sum()))]


def group_subjects(groups, positive=None) -> Subjects:
    """`groups`: the subject of each scan. `positive` (a 0/1 label per scan): stratify, subjects with any class-1
    scan apart from the others."""
    groups = np.asarray(groups)
    _, which = np.unique(groups, return_inverse=True)
    order = np.argsort(which, kind="stable")
    counts = np.bincount(which)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ids = np.arange(len(counts))
    if positive is not None:
        has = np.bincount(which, weights=np.asarray(positive, float)) > 0
        strata = [ids[~has], ids[has]]
    else:
        strata = [ids]
    return Subjects(order, starts, counts, [s for s in strata if len(s)])


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], subjects: Subjects, seed: int,
              n_resamples: int = N_RESAMPLES):
    """scipy.stats.bootstrap of `statistic(scan indices) -> figures [m]` over the subjects (per stratum), or None
    when fewer than two subjects of one stratum could vary."""
    varied = [s for s in subjects.strata if len(s) >= 2]
    fixed = np.concatenate([s for s in subjects.strata if len(s) < 2] + [np.zeros(0, int)]).astype(int)
    if not varied:
        return None

    def on_subjects(*drawn: np.ndarray) -> np.ndarray:
        return statistic(subjects.scans(np.concatenate([*(np.asarray(d, int) for d in drawn), fixed])))

    with warnings.catch_warnings():  # undefined resamples are counted and handled by the caller, not warned about
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return stats.bootstrap(tuple(varied), on_subjects, n_resamples=n_resamples, vectorized=False, paired=False,
                               confidence_level=CONFIDENCE, method=METHOD, rng=np.random.default_rng(seed))


def interval(result, j: int, point: float) -> tuple[list[float] | None, int]:
    """(the percentile interval of figure j of a `bootstrap` result, the resamples where it is undefined)."""
    if result is None or not np.isfinite(point):
        return None, 0 if result is None else int(result.bootstrap_distribution.shape[-1])
    dist = np.atleast_2d(result.bootstrap_distribution)[j]
    defined = np.isfinite(dist)
    undefined = int((~defined).sum())
    if undefined == 0:
        lo, hi = np.atleast_1d(result.confidence_interval.low)[j], np.atleast_1d(result.confidence_interval.high)[j]
        return [float(lo), float(hi)], 0
    if defined.mean() < MIN_DEFINED:
        return None, undefined
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(dist[defined], [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)], undefined


def paired_mean_difference(a, b, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict:
    """{"diff": mean over scans of a - b, "ci": its 95 % bootstrap interval over the subjects `groups` (or None),
    "n": scans}: a per-scan figure against its control on the same scans (e.g. caption fidelity minus the
    shuffled-scan control). Scans where either is NaN are left out."""
    d = np.asarray(a, float) - np.asarray(b, float)
    keep = np.isfinite(d)
    d, g = d[keep], np.asarray(groups)[keep]
    if not len(d):
        return {"diff": float("nan"), "ci": None, "n": 0}
    result = bootstrap(lambda i: np.array([d[i].mean()]), group_subjects(g), seed, n_resamples)
    point = float(d.mean())
    return {"diff": point, "ci": interval(result, 0, point)[0], "n": int(len(d))}
