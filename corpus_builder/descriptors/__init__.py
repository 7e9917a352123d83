"""The 23 descriptors of a scan (docs/design.md), in four domains, plus the 28 network-pair FC values.

    from corpus_builder.descriptors import DESCRIPTOR_NAMES, compute_descriptors
    desc = compute_descriptors(x, reference)   # x: [T, N] clean series in atlas order

`reference` (a `Reference`, fitted once on the reference cohort by `corpus_builder.norms`) holds what makes
descriptors comparable across scans: the ROI networks, the reference gradients for alignment and the group
ICA maps. A descriptor that cannot be computed is NaN with a reason in `Descriptors.missing`; nothing raises
for a bad scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors.fc import FC_NAMES, PAIR_NAMES, fc_descriptors, fisher_z_fc
from corpus_builder.descriptors.gradients import FG_NAMES, gradient_descriptors
from corpus_builder.descriptors.graph import GRAPH_NAMES, graph_descriptors
from corpus_builder.descriptors.ica import ICA_NAMES, ica_descriptors

DESCRIPTOR_NAMES = FC_NAMES + FG_NAMES + GRAPH_NAMES + ICA_NAMES
DOMAINS = {"FC": FC_NAMES, "FG": FG_NAMES, "graph": GRAPH_NAMES, "ICA": ICA_NAMES}
assert len(DESCRIPTOR_NAMES) == 23


@dataclass
class Reference:
    """Reference-cohort fits every scan's descriptors are computed against."""

    networks: np.ndarray            # [N] network name per ROI, atlas order
    gradients: np.ndarray           # [N, n_components] reference gradients (alignment template)
    ica_maps: np.ndarray            # [7, N] group-ICA map per Yeo network
    config: DescriptorConfig = field(default_factory=DescriptorConfig)


@dataclass
class Descriptors:
    values: dict[str, float]        # the 23, NaN when unavailable
    fc_pairs: dict[str, float]      # the 28 network-pair mean Fisher-z FC values
    missing: dict[str, str]         # name -> reason, for every NaN descriptor

    def vector(self) -> np.ndarray:
        return np.array([self.values[n] for n in DESCRIPTOR_NAMES], dtype=np.float64)


def usable_rois(x: np.ndarray) -> np.ndarray:
    """ROIs with finite, non-constant series (others are left out of every descriptor)."""
    finite = np.isfinite(x).all(0)
    return finite & (np.nan_to_num(x).std(0) > 1e-8)


def compute_descriptors(x: np.ndarray, ref: Reference, tr: float = 2.0) -> Descriptors:
    x = np.asarray(x, dtype=np.float64)
    valid = usable_rois(x)
    xv = np.where(valid, np.nan_to_num(x), 0.0)
    z = fisher_z_fc(xv)
    z[~valid, :] = np.nan
    z[:, ~valid] = np.nan
    cfg = ref.config
    values, missing = {}, {}
    fc_vals, pairs, why = fc_descriptors(z, ref.networks, valid)
    values.update(fc_vals), missing.update(why)
    for fn, args in ((gradient_descriptors, (z, valid, ref.networks, ref.gradients, cfg.gradient_components)),
                     (graph_descriptors, (z, valid, cfg.graph_density)),
                     (ica_descriptors, (xv, ref.ica_maps, valid, ref.networks, tr, tuple(cfg.falff_band)))):
        got, why = fn(*args)
        values.update(got), missing.update(why)
    for name in DESCRIPTOR_NAMES:
        if not np.isfinite(values[name]) and name not in missing:
            missing[name] = "not computable for this scan"
    return Descriptors(values, pairs, missing)


__all__ = ["DESCRIPTOR_NAMES", "DOMAINS", "PAIR_NAMES", "Descriptors", "Reference", "compute_descriptors"]
