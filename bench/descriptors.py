"""Benchmark: all 23 descriptors of one 450-ROI x 160 scan, single core, ours vs a naive library version.

The naive version computes the same set the straightforward way: nilearn's ConnectivityMeasure for FC,
BrainSpace's GradientMaps with Procrustes alignment, bctpy's Louvain / efficiency_wei / clustering_coef_wu,
numpy dual regression + fALFF. Both run in this process, interleaved, on the same scans; BLAS is limited to
one thread. Target: ours <= 100 ms per scan.

    .venv/bin/python bench/descriptors.py [--scans 8]
"""

from __future__ import annotations

import argparse
import time

import bct
import numpy as np
from brainspace.gradient import GradientMaps
from nilearn.connectome import ConnectivityMeasure
from sklearn.covariance import EmpiricalCovariance
from threadpoolctl import threadpool_limits

from corpus_builder.atlas import YEO7, default_labels, roi_table
from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors import compute_descriptors
from corpus_builder.descriptors.graph import threshold_graph
from corpus_builder.descriptors.ica import falff
from corpus_builder.norms import fit_reference
from corpus_builder.synth_bold import _bold_noise, group_fc, nearest_correlation


def synthetic_scans(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    chol = np.linalg.cholesky(nearest_correlation(group_fc()))
    return [_bold_noise(rng, 160, 450, 2.0) @ chol.T for _ in range(n)]


def naive(x, ref, networks, cfg: DescriptorConfig):
    r = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance()).fit_transform([x])[0]
    np.fill_diagonal(r, 0)
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    out = {}
    for net in YEO7:
        m = networks == net
        out[net] = z[np.ix_(m, m)][~np.eye(m.sum(), dtype=bool)].mean()
    gm = GradientMaps(n_components=cfg.gradient_components, approach="dm", kernel="normalized_angle",
                      alignment="procrustes", random_state=0)
    gm.fit(r, reference=ref.gradients)
    g1 = gm.aligned_[:, 0]
    out["g1var"] = g1.var()
    w = threshold_graph(z, cfg.graph_density)
    w = w / w.max()
    _, out["q"] = bct.modularity_louvain_und(w, seed=0)
    out["eff"] = bct.efficiency_wei(w)
    out["clu"] = bct.clustering_coef_wu(w).mean()
    out["str"] = bct.strengths_und(w).mean()
    tc = np.linalg.lstsq(ref.ica_maps.T, x.T, rcond=None)[0].T
    out["falff"] = falff(tc, 2.0, tuple(cfg.falff_band))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    networks = roi_table(default_labels())["network"].to_numpy()
    cfg = DescriptorConfig()
    ref = fit_reference(synthetic_scans(6, rng), networks, cfg)
    scans = synthetic_scans(args.scans, rng)
    ours, theirs = [], []
    with threadpool_limits(1):
        compute_descriptors(scans[0], ref)  # warm-up (imports, BLAS init)
        for x in scans:  # interleaved, so machine noise hits both alike
            t = time.perf_counter()
            compute_descriptors(x, ref)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            naive(x, ref, networks, cfg)
            theirs.append(time.perf_counter() - t)
    o, n = np.median(ours) * 1000, np.median(theirs) * 1000
    print(f"scans: {len(scans)}  (450 ROIs x 160 volumes, 1 BLAS thread)")
    print(f"ours : {o:8.1f} ms/scan (median)   target <= 100 ms")
    print(f"naive: {n:8.1f} ms/scan (median; nilearn + BrainSpace + bctpy)")
    print(f"speed-up ours vs naive: {n / o:.1f}x")


if __name__ == "__main__":
    main()
