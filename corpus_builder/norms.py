"""Reference-cohort fits: the group ICA maps and reference gradients (`Reference`), and the mean / std of
every descriptor (`Norms`) that turns raw values into z-scores.

Both are fitted on the reference cohort only (by default the training split of the reference dataset), never
on validation or test subjects: the reference implementation z-scored over the whole cohort, test subjects
included, which leaks evaluation data into the captions.

Files: `norms.json` (cohort, count, per-descriptor and per-pair mean/std) and `reference.npz` (networks,
gradients, ICA maps; loaded with allow_pickle=False).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES, Descriptors, Reference
from corpus_builder.descriptors.fc import fisher_z_fc
from corpus_builder.descriptors.gradients import reference_gradients
from corpus_builder.descriptors.ica import fit_group_ica


def fit_reference(series: list[np.ndarray], networks: np.ndarray, cfg: DescriptorConfig, seed: int = 0) -> Reference:
    """Group ICA maps and the gradient template from the reference cohort's clean series."""
    if len(series) < 2:
        raise ValueError(f"reference cohort has {len(series)} scan(s); need at least 2")
    maps, _ = fit_group_ica(series, networks, cfg.ica_components, seed)
    with warnings.catch_warnings():  # an ROI pair NaN in every scan stays NaN ("Mean of empty slice")
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_z = np.nanmean([fisher_z_fc(np.asarray(x, dtype=np.float64)) for x in series], axis=0)
    gradients = reference_gradients(np.tanh(mean_z), cfg.gradient_components, seed)
    return Reference(networks=np.asarray(networks), gradients=gradients, ica_maps=maps, config=cfg)


def save_reference(ref: Reference, path: Path) -> None:
    np.savez(path, networks=ref.networks.astype(str), gradients=ref.gradients, ica_maps=ref.ica_maps)


def load_reference(path: Path, cfg: DescriptorConfig) -> Reference:
    with np.load(path, allow_pickle=False) as f:
        return Reference(f["networks"], f["gradients"], f["ica_maps"], cfg)


@dataclass
class Norms:
    cohort: str
    count: int
    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, descriptors: list[Descriptors], cohort: str) -> Norms:
        if not descriptors:
            raise ValueError(f"reference cohort {cohort!r} is empty")
        mean, std = {}, {}
        for names, get in ((DESCRIPTOR_NAMES, lambda d: d.values), (PAIR_NAMES, lambda d: d.fc_pairs)):
            table = np.array([[get(d)[n] for n in names] for d in descriptors], dtype=np.float64)
            with np.errstate(all="ignore"), warnings.catch_warnings():  # a descriptor missing cohort-wide: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                m, s = np.nanmean(table, 0), np.nanstd(table, 0)
            mean.update(zip(names, m.tolist()))
            std.update(zip(names, s.tolist()))
        return cls(cohort, len(descriptors), mean, std)

    def z(self, d: Descriptors) -> tuple[dict[str, float], dict[str, float]]:
        """(z of the 23 descriptors, z of the 28 pairs); NaN where the value or the norm is missing."""
        def one(name: str, value: float) -> float:
            s = self.std.get(name, np.nan)
            if not np.isfinite(value) or not np.isfinite(s) or s <= 0:
                return float("nan")
            return float((value - self.mean[name]) / s)

        return ({n: one(n, d.values[n]) for n in DESCRIPTOR_NAMES},
                {n: one(n, d.fc_pairs[n]) for n in PAIR_NAMES})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"cohort": self.cohort, "count": self.count, "mean": self.mean,
                                    "std": self.std}, indent=2, allow_nan=True))

    @classmethod
    def load(cls, path: Path) -> Norms:
        data = json.loads(Path(path).read_text())
        return cls(data["cohort"], data["count"], data["mean"], data["std"])
