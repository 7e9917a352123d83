"""Functional connectivity descriptors: Fisher-z FC, within-network strength, network-pair coupling."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from corpus_builder.atlas import NETWORKS, SUBCORTICAL, YEO7

FC_NAMES = tuple(f"fc_within_{net}" for net in YEO7) + ("fc_subcortical_cortical",)
PAIRS = tuple(combinations(NETWORKS, 2))  # 28 pairs of the 7 Yeo networks + subcortical
PAIR_NAMES = tuple(f"{a}-{b}" for a, b in PAIRS)


def fisher_z_fc(x: np.ndarray) -> np.ndarray:
    """[T, N] -> [N, N] Fisher-z correlation; NaN rows/columns for constant ROIs, 0 on the diagonal."""
    x = x - x.mean(0)
    norm = np.sqrt((x * x).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x.T @ x) / np.outer(norm, norm)
    np.fill_diagonal(r, 0.0)
    return np.arctanh(np.clip(r, -0.999999, 0.999999))


def block_mean(z: np.ndarray, a: np.ndarray, b: np.ndarray, same: bool) -> float:
    """Mean Fisher z between the ROIs of masks `a` and `b` (distinct ROIs when `same`), NaN entries left out."""
    block = z[np.ix_(a, b)]
    if same:
        block = block[~np.eye(len(block), dtype=bool)]
    return float(np.nanmean(block)) if np.isfinite(block).any() else np.nan


def fc_descriptors(z: np.ndarray, networks: np.ndarray, valid: np.ndarray) -> tuple[dict, dict, dict]:
    """(8 FC descriptors, 28 pair means, reasons for NaN) from Fisher-z FC and per-ROI network labels."""
    values, reasons = {}, {}
    masks = {net: (networks == net) & valid for net in NETWORKS}
    for net in YEO7:
        name = f"fc_within_{net}"
        if masks[net].sum() < 2:
            values[name], reasons[name] = np.nan, f"fewer than 2 usable ROIs in network {net}"
        else:
            values[name] = block_mean(z, masks[net], masks[net], True)
    cortex = valid & (networks != SUBCORTICAL)
    if masks[SUBCORTICAL].any() and cortex.any():
        values["fc_subcortical_cortical"] = block_mean(z, masks[SUBCORTICAL], cortex, False)
    else:
        values["fc_subcortical_cortical"] = np.nan
        reasons["fc_subcortical_cortical"] = "no usable subcortical or cortical ROI"
    pairs = {}
    for (a, b), name in zip(PAIRS, PAIR_NAMES):
        pairs[name] = block_mean(z, masks[a], masks[b], False) if masks[a].any() and masks[b].any() else np.nan
    return values, pairs, reasons
