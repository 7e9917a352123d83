"""Connectivity tokens: nilearn's FC averaged per network pair, levels from the train split, the model reads them."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from nilearn.connectome import ConnectivityMeasure
from sklearn.covariance import EmpiricalCovariance

from corpus_builder.readers import open_zarr, read_rois, split_keys
from fmrilm_core.errors import InputError
from fmrilm_core.runtime import LocalRuntime
from llm_train.connectivity import ConnectivityTokens, fit_on_corpus, network_fc, network_pairs
from tests.conftest import N_ROIS, align_cfg

LABELS = ["Vis"] * 4 + ["Default"] * 5 + ["Limbic"] * 1 + ["SomMot"] * 2


def scans(n: int, seed: int, t: int = 60, default_shared: float = 0.0) -> np.ndarray:
    """n scans [n, t, 12] of noise, with a signal shared by the Default ROIs at weight `default_shared`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, len(LABELS)))
    default = np.array([v == "Default" for v in LABELS])
    x[:, :, default] += default_shared * rng.standard_normal((n, t, 1))
    return x.astype(np.float32)


def edges_by_hand(corpus, bins: int, splits: tuple[str, ...]) -> np.ndarray:
    """[P, bins - 1] level edges from the scans of `splits`: nilearn's Pearson FC, Fisher z, mean over each network
    pair's distinct ROI pairs, numpy quantiles; written out here, apart from the code under test."""
    labels = list(read_rois(corpus)["network"])
    networks = sorted(set(labels))
    m = np.array([networks.index(v) for v in labels])
    keys = [k for split in splits for k in split_keys(corpus, split)]
    x = open_zarr(corpus).batch(keys).astype(np.float64)
    r = ConnectivityMeasure(EmpiricalCovariance(), kind="correlation", standardize=False).fit_transform(list(x))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    off = ~np.eye(len(labels), dtype=bool)
    blocks = [off & np.outer(m == a, m == b) for a in range(len(networks)) for b in range(a, len(networks))]
    values = np.stack([z[:, block].mean(1) for block in blocks if block.any()], 1)
    return np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1], axis=0).T


def test_network_fc_is_nilearns_fisher_z_correlation_averaged_over_each_network_pair():
    x = scans(3, 0)
    networks = sorted(set(LABELS))
    membership = np.array([networks.index(v) for v in LABELS])
    pairs = network_pairs(membership, len(networks))
    assert (networks.index("Limbic"),) * 2 not in pairs  # one ROI: no pair of distinct ROIs within it
    ours = network_fc(x, membership, pairs).numpy()
    r = ConnectivityMeasure(EmpiricalCovariance(), kind="correlation", standardize=False).fit_transform(
        list(x.astype(np.float64)))  # nilearn's default estimator shrinks (Ledoit-Wolf); FC here is plain Pearson
    for s in range(len(x)):
        z = np.arctanh(np.clip(r[s], -0.999999, 0.999999))
        for p, (a, b) in enumerate(pairs):
            block = [z[i, j] for i in range(12) for j in range(12)
                     if i != j and membership[i] == a and membership[j] == b]
            assert ours[s, p] == pytest.approx(np.mean(block), abs=1e-5)


def test_levels_split_the_train_scans_evenly_and_a_coherent_default_network_reads_very_high():
    spec = ConnectivityTokens.fit([scans(100, 1)[:50], scans(100, 1)[50:]], LABELS, bins=4)
    levels = spec.levels(torch.from_numpy(scans(100, 1)))
    for p in range(spec.n_tokens):
        assert np.bincount(levels[:, p].numpy(), minlength=4).tolist() == [25, 25, 25, 25]
    dd = spec.pairs.index((spec.networks.index("Default"),) * 2)
    coherent = spec.levels(torch.from_numpy(scans(4, 2, default_shared=1.0)))
    assert (coherent[:, dd] == 3).all()
    assert spec.phrases()[dd * 4 + 3] == "Default-Default connectivity: very high"
    back = ConnectivityTokens.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec


def test_bad_input_is_one_line_naming_the_corpus():
    with pytest.raises(InputError, match=r"^/data/c: rois.tsv names no network for some ROI"):
        ConnectivityTokens.fit([scans(8, 0)], LABELS[:-1] + [""], bins=4, source="/data/c")
    with pytest.raises(InputError, match="3 train scans cannot fit 4 connectivity levels"):
        ConnectivityTokens.fit([scans(3, 0)], LABELS, bins=4)
    spec = ConnectivityTokens.fit([scans(8, 0)], LABELS, bins=2)
    with pytest.raises(InputError, match="a scan has 11 ROIs, the model's atlas 12"):
        spec.levels(torch.from_numpy(scans(1, 0)[:, :, :11]))


def test_levels_are_fitted_on_the_train_scans_only(stage1):
    corpus, _ = stage1
    assert split_keys(corpus, "val")  # held-out scans exist, and must not move the edges
    spec = fit_on_corpus(corpus, 4)  # what stage 2 calls when it starts (llm_train.train)
    train_only = edges_by_hand(corpus, 4, ("train",))
    everything = edges_by_hand(corpus, 4, ("train", "val", "test"))
    assert np.asarray(spec.edges) == pytest.approx(train_only, abs=1e-5)
    assert np.abs(train_only - everything).max() > 1e-3  # so edges fitted on every scan would fail the line above


def test_a_network_pair_without_fc_is_an_error_naming_the_scan_never_level_0():
    spec = ConnectivityTokens.fit([scans(40, 3)], LABELS, bins=4)
    x = scans(3, 4)
    x[1, :, 4] = 0.0  # one of five Default ROIs constant: the pair means leave it out, no error
    x[2, :, 10] = 5.0  # one of the two SomMot ROIs constant: no SomMot-SomMot ROI pair is left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert spec.levels(torch.from_numpy(x[:2])).shape == (2, spec.n_tokens)
        with pytest.raises(InputError, match=r"^connectivity tokens: the scan at position 2 has no FC for network "
                                             r"pair SomMot-SomMot \(no usable ROI pair"):
            spec.levels(torch.from_numpy(x))
        with pytest.raises(InputError, match="scan UKB-b-1-1 has no FC for network pair SomMot-SomMot"):
            replace(spec, first_id=100).ids(torch.from_numpy(x), keys=["UKB-a-1-1", "UKB-a-2-1", "UKB-b-1-1"])
        with pytest.raises(InputError, match=r"^/data/c: scan k42 has no FC for network pair SomMot-SomMot"):
            ConnectivityTokens.fit([scans(40, 3), x], LABELS, bins=4, source="/data/c",
                                   keys=[f"k{i}" for i in range(43)])
    assert not caught, [str(w.message) for w in caught]  # nothing to mute: no warning is raised on the way


def test_stage2_adds_the_tokens_from_their_phrases_saves_them_and_the_model_reads_them(stage1, llm_dir, tmp_path):
    from evaluation.task_eval import ScanCache
    from llm_train.export import load_aligned
    from llm_train.scoring import option_loglik, question_ids
    from llm_train.train import AlignInputs, build_model, train
    from tokenizer_train.model import BrainTokenizer

    corpus, tok_dir = stage1
    cfg = align_cfg(llm_dir, steps=3, eval_every=3, checkpoint_every=3)
    spec = fit_on_corpus(corpus, cfg.connectivity_bins)
    model, tokenizer, n_text, _ = build_model(cfg, BrainTokenizer.from_pretrained(tok_dir), {}, spec)
    c = model.connectivity
    assert c.first_id == model.vocab.first_id + model.vocab.size and len(tokenizer) == c.first_id + c.size
    rows = model.backbone.get_input_embeddings().weight
    for k in (0, c.size - 1):  # each row starts as the mean of its phrase's text rows
        ids = tokenizer(c.phrases()[k], add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(rows[c.first_id + k], rows[ids].mean(0))

    out = tmp_path / "llm"
    train(cfg, AlignInputs(corpus, tok_dir, out), LocalRuntime(out / "checkpoints"))
    saved = json.loads((out / "brain.json").read_text())["connectivity"]["edges"]
    assert np.asarray(saved) == pytest.approx(edges_by_hand(corpus, cfg.connectivity_bins, ("train",)), abs=1e-5)
    model, tokenizer, brain_tokenizer, _ = load_aligned(out)
    assert model.connectivity.edges == spec.edges and model.scan_tokens == 4 * N_ROIS + 2 + c.n_tokens
    cache = ScanCache(corpus, brain_tokenizer, False, model.connectivity)
    batch = cache.scans(split_keys(corpus, "val")[:2])
    assert batch["connectivity"].shape == (2, c.n_tokens)
    q = question_ids(tokenizer, "Is this subject male or female?")
    options = [tokenizer(" male", add_special_tokens=False)["input_ids"],
               tokenizer(" female", add_special_tokens=False)["input_ids"]]
    before = option_loglik(model, batch, q, options)
    flipped = dict(batch, connectivity=c.first_id + (c.bins - 1 - (batch["connectivity"] - c.first_id) % c.bins)
                   + (batch["connectivity"] - c.first_id) // c.bins * c.bins)
    assert not torch.allclose(option_loglik(model, flipped, q, options), before)  # the answer reads the tokens
    with pytest.raises(ValueError, match="encode its scans with encode_scans"):
        option_loglik(model, {"codes": batch["codes"]}, q, options)
