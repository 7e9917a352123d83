"""Each descriptor against an independent computation on small known inputs (issue: corpus_builder II)."""

import bct
import networkx as nx
import numpy as np
import pytest
from brainspace.gradient import GradientMaps
from nilearn.connectome import ConnectivityMeasure
from sklearn.covariance import EmpiricalCovariance

from corpus_builder.atlas import default_labels, roi_table
from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, compute_descriptors
from corpus_builder.descriptors.fc import fc_descriptors, fisher_z_fc
from corpus_builder.descriptors.gradients import diffusion_gradients, normalized_angle_kernel
from corpus_builder.descriptors.graph import (
    global_efficiency,
    louvain_modularity,
    threshold_graph,
    weighted_clustering,
)
from corpus_builder.descriptors.ica import falff
from corpus_builder.norms import Norms, fit_reference, load_reference, save_reference
from corpus_builder.synth import group_fc

NETWORKS = roi_table(default_labels())["network"].to_numpy()


def network_series(rng, t=160, strength=1.0, networks=NETWORKS):
    """Series whose ROIs share a network-specific signal: known block structure."""
    names = sorted(set(networks))
    shared = rng.standard_normal((t, len(names)))
    idx = np.array([names.index(n) for n in networks])
    return rng.standard_normal((t, len(networks))) + strength * shared[:, idx]


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    return fit_reference([network_series(rng) for _ in range(6)], NETWORKS, DescriptorConfig())


def test_fc_matches_nilearn_and_block_means():
    rng = np.random.default_rng(1)
    x = network_series(rng)
    r = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance()).fit_transform([x])[0]
    z = fisher_z_fc(x)
    off = ~np.eye(len(r), dtype=bool)
    np.testing.assert_allclose(np.tanh(z[off]), r[off], atol=1e-5)
    values, pairs, _ = fc_descriptors(z, NETWORKS, np.ones(len(r), bool))
    m = NETWORKS == "Default"
    block = np.arctanh(r[np.ix_(m, m)][~np.eye(m.sum(), dtype=bool)])
    assert values["fc_within_Default"] == pytest.approx(block.mean(), rel=1e-4)
    assert len(pairs) == 28 and values["fc_within_Default"] > pairs["Vis-Default"]


def test_block_diagonal_fc_has_high_modularity():
    rng = np.random.default_rng(2)
    blocks = np.kron(np.eye(5), np.ones((20, 20))) * 0.8 + rng.uniform(0, 0.05, (100, 100))
    blocks = (blocks + blocks.T) / 2
    noise = rng.uniform(0, 0.85, (100, 100))
    noise = (noise + noise.T) / 2
    high = louvain_modularity(threshold_graph(blocks, 0.2))
    low = louvain_modularity(threshold_graph(noise, 0.2))
    assert high > 0.6 and low < 0.35
    # the same partition quality networkx finds
    g = nx.from_numpy_array(threshold_graph(blocks, 0.2))
    parts = nx.community.louvain_communities(g, weight="weight", seed=0)
    assert high == pytest.approx(nx.community.modularity(g, parts, weight="weight"), abs=0.02)


def test_efficiency_and_clustering_equal_bctpy():
    rng = np.random.default_rng(3)
    w = rng.uniform(0, 1, (30, 30))
    w = (w + w.T) / 2
    w = threshold_graph(w, 0.3)
    assert global_efficiency(w) == pytest.approx(bct.efficiency_wei(w), rel=1e-9)
    np.testing.assert_allclose(weighted_clustering(w), bct.clustering_coef_wu(w / w.max()), rtol=1e-9)


def test_disconnected_graph_efficiency_counts_unreachable_pairs_as_zero():
    w = np.zeros((6, 6))
    w[0, 1] = w[1, 0] = w[3, 4] = w[4, 3] = 0.5
    assert global_efficiency(w) == pytest.approx(bct.efficiency_wei(w), rel=1e-9)


def test_falff_of_pure_low_frequency_sine_is_near_one():
    t = np.arange(160) * 2.0
    sine = np.sin(2 * np.pi * 0.05 * t)[:, None]
    fast = np.sin(2 * np.pi * 0.2 * t)[:, None]
    assert falff(sine, 2.0, (0.01, 0.08))[0] > 0.95
    assert falff(fast, 2.0, (0.01, 0.08))[0] < 0.05


def test_diffusion_map_eigenvalues_exact_and_gradients_match_brainspace():
    fc = group_fc()[50:, 50:]  # the real Schaefer-400 group FC that BrainSpace ships
    grad, lambdas = diffusion_gradients(fc, 10)
    k = normalized_angle_kernel(fc)
    d = k.sum(1) ** -0.5
    k = k * np.outer(d, d)
    markov = k / k.sum(1, keepdims=True)
    exact = np.sort(np.linalg.eigvals(markov).real)[::-1][1:11]
    np.testing.assert_allclose(lambdas, exact, atol=1e-10)
    # BrainSpace runs a symmetric eigensolver on the non-symmetric Markov matrix, so its eigenvalues are a few
    # percent off the exact ones above; its gradients still agree with ours
    bs = GradientMaps(n_components=10, approach="dm", kernel="normalized_angle", random_state=0).fit(fc)
    for i in range(4):
        assert abs(np.corrcoef(grad[:, i], bs.gradients_[:, i])[0, 1]) > 0.98


def test_all_23_descriptors_and_nan_reasons(reference):
    rng = np.random.default_rng(5)
    x = network_series(rng)
    d = compute_descriptors(x, reference)
    assert list(d.values) == list(DESCRIPTOR_NAMES) and not d.missing
    assert all(np.isfinite(v) for v in d.values.values())
    bad = x.copy()
    bad[:, NETWORKS == "Limbic"] = 0.0       # constant ROIs: a whole network gone
    bad[3, 0] = np.nan                       # a NaN ROI
    d = compute_descriptors(bad, reference)
    assert np.isnan(d.values["fc_within_Limbic"]) and "Limbic" in d.missing["fc_within_Limbic"]
    assert np.isnan(d.values["falff_Limbic"])
    assert np.isfinite(d.values["fc_within_Default"]) and np.isfinite(d.values["graph_modularity"])


def test_too_short_for_falff_band_is_nan_with_reason(reference):
    d = compute_descriptors(network_series(np.random.default_rng(6), t=40), reference)
    assert np.isnan(d.values["falff_Default"]) and "0.01 Hz" in d.missing["falff_Default"]
    assert np.isfinite(d.values["fc_within_Default"])


def test_custom_atlas_network_without_roi(reference):
    nets = NETWORKS.copy()
    nets[nets == "Limbic"] = "Default"
    ref = fit_reference([network_series(np.random.default_rng(i), networks=nets) for i in range(3)], nets,
                        DescriptorConfig())
    d = compute_descriptors(network_series(np.random.default_rng(7), networks=nets), ref)
    assert np.isnan(d.values["fc_within_Limbic"]) and np.isnan(d.values["falff_Limbic"])
    assert "Limbic" in d.missing["fc_within_Limbic"]


def test_norms_zscore_and_round_trip(reference, tmp_path):
    rng = np.random.default_rng(8)
    descs = [compute_descriptors(network_series(rng, strength=s), reference) for s in (0.5, 1.0, 1.5, 2.0)]
    norms = Norms.fit(descs, "UKB/train")
    z, pair_z = norms.z(descs[-1])
    assert z["fc_within_Default"] > 1.0 and len(pair_z) == 28
    norms.save(tmp_path / "norms.json")
    assert Norms.load(tmp_path / "norms.json") == norms
    save_reference(reference, tmp_path / "reference.npz")
    again = load_reference(tmp_path / "reference.npz", DescriptorConfig())
    np.testing.assert_array_equal(again.ica_maps, reference.ica_maps)
    assert compute_descriptors(network_series(np.random.default_rng(9)), again).values == \
        compute_descriptors(network_series(np.random.default_rng(9)), reference).values
