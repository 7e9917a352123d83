"""UKB CSV pairs, ABCD CIFTI-2 dense series and the reference HDF5 files, end to end through
`sources.discover` + `sources.extract` on tiny fixture trees."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.cifti2 import BrainModelAxis, LabelAxis, SeriesAxis

from corpus_builder import sources
from corpus_builder.atlas import default_labels
from corpus_builder.config import AtlasConfig, CleaningConfig, SourceConfig, UKBConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.records import ScanError
from corpus_builder.sources import ukb_csv
from fmrilm_core.errors import InputError

KEY = Pseudonymizer(b"test-secret-0123456789")
T_OUT = 20
PERIOD = 20.0   # seconds: a slow oscillation that is 10 volumes long at TR 2.0 s


def _cfg(n_rois: int, **atlas) -> SourceConfig:
    return SourceConfig(atlas=AtlasConfig(n_rois=n_rois, **atlas), cleaning=CleaningConfig(length=T_OUT))


def _series(n_vol: int, tr: float, n: int, seed: int = 0) -> np.ndarray:
    """[n_vol, n]: the same slow sine in every column plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_vol) * tr
    return np.sin(2 * np.pi * t / PERIOD)[:, None] + 0.2 * rng.normal(size=(n_vol, n))


def _run(root, cfg):
    records = sources.discover(str(root), cfg, KEY)
    out = {}
    for rec in records:
        out[rec.key] = (rec, *sources.extract(rec, cfg))
    return out


def _by_subject(results, dataset, raw_id):
    pseudo = KEY(dataset, raw_id)
    return [v for v in results.values() if v[0].subject == pseudo]


def _assert_resampled(rec, x, tr):
    """Shape [T, N], native TR recorded, and the 20 s oscillation is 10 volumes long (TR 2.0 s grid)."""
    assert x.shape[0] == T_OUT
    assert rec.qc["original_tr"] == pytest.approx(tr)
    spectrum = np.abs(np.fft.rfft(x.mean(1)))
    assert int(np.argmax(spectrum[1:])) + 1 == round(T_OUT * 2.0 / PERIOD)


# --- UK Biobank CSV pairs -----------------------------------------------------------------------------

TIAN = ["THA-DP-rh", "HIP-head-m-rh", "THA-DP-lh", "HIP-head-m-lh"]
SCHAEFER = ["7Networks_LH_Vis_1", "7Networks_LH_Default_1", "7Networks_RH_Vis_1", "7Networks_RH_Default_1",
            "7Networks_RH_Cont_1", "7Networks_LH_Cont_1"]


def _ukb_csv(path, labels, values):
    """Rows = ROIs, one column per volume, `label_name` first."""
    frame = pd.DataFrame(values.T, columns=[str(i) for i in range(values.shape[0])])
    frame.insert(0, "label_name", labels)
    frame.to_csv(path, index=False)


def _ukb_subject(root, folder, eid, n_vol=60, tian=TIAN, schaefer=SCHAEFER, schaefer_vol=None, halves="both"):
    d = root / folder
    d.mkdir(parents=True)
    x = _series(n_vol, ukb_csv.UKB_TR, len(tian) + len(schaefer), seed=int(eid) % 97)
    if halves in ("both", "tian"):
        _ukb_csv(d / f"{eid}_20227_2_0_TianS3_timeseries.csv", tian, x[:, : len(tian)])
    if halves in ("both", "schaefer"):
        y = x[:, len(tian):] if schaefer_vol is None else _series(schaefer_vol, ukb_csv.UKB_TR, len(schaefer))
        _ukb_csv(d / f"{eid}_20227_2_0_Schaefer7n400p_timeseries.csv", schaefer, y)
    return x


@pytest.fixture
def ukb_root(tmp_path):
    root = tmp_path / "ukb"
    root.mkdir()
    x_good = _ukb_subject(root, "1000001_20227_2_0", "1000001")
    _ukb_subject(root, "1000002", "1000002")                                   # bare eid folder
    _ukb_subject(root, "1000003_20227_3_0", "1000003", halves="tian")          # Schaefer half missing
    _ukb_subject(root, "1000004_20227_2_0", "1000004", schaefer=SCHAEFER[:5])  # wrong ROI count
    _ukb_subject(root, "1000005_20227_2_0", "1000005", schaefer_vol=58)        # volume counts differ
    _ukb_subject(root, "1000006_20227_2_0", "1000006")                         # not in the field table
    (root / "notes").mkdir()                                                   # not a subject folder
    fields = pd.DataFrame({"eid": [1000001, 1000002, 1000003, 1000004, 1000005],
                           "31-0.0": [1, 0, 1, 0, 1], "21003-2.0": [63, 58, 70, 66, 49],
                           "20016-2.0": [7, 5, None, 6, 8]})
    fields.to_csv(tmp_path / "ukb_fields.csv", index=False)
    return root, tmp_path / "ukb_fields.csv", x_good


def test_ukb_csv_pairs(ukb_root):
    root, fields, x_good = ukb_root
    assert sources.detect(root) == "ukb_csv"
    cfg = _cfg(len(TIAN) + len(SCHAEFER))
    cfg.ukb = UKBConfig(phenotypes=fields)
    results = _run(root, cfg)
    assert len(results) == 6

    [(rec, x, labels)] = _by_subject(results, "UKB", "1000001")
    assert rec.error is None and (rec.dataset, rec.session, rec.run) == ("UKB", "2", "1")
    assert x.shape == (T_OUT, 10) and x.dtype == np.float32
    assert labels == TIAN + SCHAEFER                                           # Tian rows first
    _assert_resampled(rec, x, 0.735)
    assert rec.qc["original_length"] == 60
    assert rec.phenotypes["sex"] == "M"
    assert rec.phenotypes["age"] == pytest.approx(63)
    assert rec.phenotypes["fluid_intelligence"] == pytest.approx(7)
    raw = sources.load_scan(rec, cfg)
    np.testing.assert_allclose(raw.data, x_good)                               # [T, N]: the CSVs transposed

    [(rec2, x2, _)] = _by_subject(results, "UKB", "1000002")
    assert rec2.error is None and rec2.session == "2" and x2.shape == (T_OUT, 10)
    assert rec2.phenotypes["sex"] == "F"

    failures = {eid: _by_subject(results, "UKB", eid)[0][0].error for eid in ("1000003", "1000004", "1000005",
                                                                                "1000006")}
    for eid, error in failures.items():
        assert error and "\n" not in error and eid not in error, (eid, error)
    assert "missing the Schaefer-400 CSV" in failures["1000003"]
    assert _by_subject(results, "UKB", "1000003")[0][0].session == "3"
    assert "Schaefer-400 CSV 5" in failures["1000004"] and "expected 10" in failures["1000004"]
    assert "Tian S3 CSV has 60 volumes, the Schaefer-400 CSV 58" in failures["1000005"]
    assert "UKB field table" in failures["1000006"]


def test_ukb_csv_without_field_table_and_full_atlas_counts(ukb_root, tmp_path):
    root, _fields, _x = ukb_root
    records = sources.discover(f"ukb_csv:{root}", _cfg(10), KEY)
    good = [r for r in records if r.subject == KEY("UKB", "1000006")]
    assert good[0].error is None and good[0].phenotypes == {}
    # with the full 450-ROI atlas each half is checked on its own
    d = tmp_path / "full" / "2000001_20227_2_0"
    d.mkdir(parents=True)
    _ukb_csv(d / "a_TianS3.csv", [f"T{i}-lh" for i in range(49)], np.zeros((30, 49)))
    _ukb_csv(d / "a_Schaefer400.csv", [f"S{i}" for i in range(401)], np.zeros((30, 401)))
    [rec] = ukb_csv.discover(tmp_path / "full", _cfg(450), KEY)
    with pytest.raises(ScanError, match="Tian S3 CSV has 49 ROI rows, expected 50"):
        ukb_csv.load(rec, _cfg(450))


# --- ABCD CIFTI-2 -------------------------------------------------------------------------------------

# table order: cortex first; the thalamus labels must come first in the output
LABEL_TABLE = {0: ("???", (0, 0, 0, 0)), 1: ("7Networks_LH_Vis_1", (1, 0, 0, 1)),
               2: ("7Networks_RH_Default_1", (0, 1, 0, 1)), 3: ("THA-DP-lh", (0, 0, 1, 1)),
               4: ("THA-DP-rh", (1, 1, 0, 1))}
KEYS = np.array([1, 1, 0, 1, 2, 2, 0, 3, 3, 4, 4])     # per grayordinate of _brain_models()
MEANS = {"7Networks_LH_Vis_1": [0, 1, 3], "7Networks_RH_Default_1": [4, 5], "THA-DP-lh": [7, 8],
         "THA-DP-rh": [9, 10]}
ABCD_TR = 0.8


def _brain_models(n_left=4) -> BrainModelAxis:
    left, right = np.zeros((2, 2, 1)), np.zeros((2, 2, 1))
    left[0], right[1] = 1, 1
    return (BrainModelAxis.from_surface(np.array([0, 2, 3, 5][:n_left]), 8, name="CortexLeft")
            + BrainModelAxis.from_surface(np.array([1, 4, 6]), 8, name="CortexRight")
            + BrainModelAxis.from_mask(left, name="thalamus_left", affine=np.eye(4))
            + BrainModelAxis.from_mask(right, name="thalamus_right", affine=np.eye(4)))


def _dtseries(path, n_vol=60, n_left=4, seed=0):
    models = _brain_models(n_left)
    data = _series(n_vol, ABCD_TR, len(models), seed).astype(np.float32)
    img = nib.Cifti2Image(data, header=(SeriesAxis(0, ABCD_TR, n_vol), models))
    img.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SERIES")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return data


def _dlabel(path):
    img = nib.Cifti2Image(KEYS[None].astype(np.float32), header=(LabelAxis(["parc"], LABEL_TABLE), _brain_models()))
    img.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_LABELS")
    nib.save(img, path)


def _func(root, sub, ses, run):
    return (root / f"sub-{sub}" / f"ses-{ses}" / "func"
            / f"sub-{sub}_ses-{ses}_task-rest_run-{run}_bold_timeseries.dtseries.nii")


@pytest.fixture
def abcd_root(tmp_path):
    root = tmp_path / "abcd"
    base, follow = "baselineYear1Arm1", "2YearFollowUpYear1Arm1"
    data = {"r1": _dtseries(_func(root, "NDARINVAAA", base, 1), seed=1),
            "r2": _dtseries(_func(root, "NDARINVAAA", follow, 1), seed=2)}
    _dtseries(_func(root, "NDARINVBBB", base, 1), n_left=2)                  # 9 grayordinates, not 11
    _dtseries(_func(root, "NDARINVCCC", base, 1))                            # no participants row
    pd.DataFrame({"participant_id": ["sub-NDARINVAAA", "sub-NDARINVAAA", "sub-NDARINVBBB"],
                  "session_id": [f"ses-{base}", f"ses-{follow}", f"ses-{base}"],
                  "sex": ["F", "F", "M"], "age": [9.5, 11.5, 10], "site": ["site01", "site01", "site02"]}
                 ).to_csv(root / "participants.tsv", sep="\t", index=False)
    _dlabel(tmp_path / "atlas.dlabel.nii")
    names = [LABEL_TABLE[k][0] if k else "" for k in KEYS]
    (tmp_path / "atlas_labels.tsv").write_text("\n".join(names) + "\n")
    return root, data


def _expected_means(data):
    return np.stack([data[:, MEANS[name]].mean(1) for name in MEANS], axis=1)


def test_abcd_cifti_dlabel(abcd_root, tmp_path):
    root, data = abcd_root
    assert sources.detect(root) == "abcd_cifti"
    cfg = _cfg(4, cifti_labels=tmp_path / "atlas.dlabel.nii")
    results = _run(root, cfg)
    assert len(results) == 4
    runs = {rec.session: (rec, x, labels) for rec, x, labels in _by_subject(results, "ABCD", "NDARINVAAA")}
    assert set(runs) == {"baselineYear1Arm1", "2YearFollowUpYear1Arm1"}
    rec, x, labels = runs["baselineYear1Arm1"]
    assert rec.error is None and rec.dataset == "ABCD" and rec.run == "1"
    assert x.shape == (T_OUT, 4)
    assert labels == ["THA-DP-lh", "THA-DP-rh", "7Networks_LH_Vis_1", "7Networks_RH_Default_1"]
    _assert_resampled(rec, x, ABCD_TR)
    assert rec.site == "site01" and rec.phenotypes == {"sex": "F", "age": 9.5}
    assert runs["2YearFollowUpYear1Arm1"][0].phenotypes["age"] == 11.5       # the session's row
    raw = sources.load_scan(rec, cfg)                                          # label table order, native TR
    assert raw.labels == list(MEANS) and raw.tr == pytest.approx(ABCD_TR)
    np.testing.assert_allclose(raw.data, _expected_means(data["r1"]), rtol=1e-5, atol=1e-6)

    [(bad, xb, _)] = _by_subject(results, "ABCD", "NDARINVBBB")
    assert xb is None and bad.error == "label file has 11 grayordinates, the image 9"
    [(missing, xm, _)] = _by_subject(results, "ABCD", "NDARINVCCC")
    assert xm is None and "participants.tsv" in missing.error and "NDARINV" not in missing.error


def test_abcd_cifti_tsv_labels_match_dlabel(abcd_root, tmp_path):
    root, data = abcd_root
    cfg = _cfg(4, cifti_labels=tmp_path / "atlas_labels.tsv")
    records = sources.discover(f"abcd_cifti:{root}", cfg, KEY)
    rec = next(r for r in records if r.subject == KEY("ABCD", "NDARINVAAA") and r.session == "baselineYear1Arm1")
    raw = sources.load_scan(rec, cfg)
    assert raw.labels == list(MEANS)
    np.testing.assert_allclose(raw.data, _expected_means(data["r1"]), rtol=1e-5, atol=1e-6)
    bad = next(r for r in records if r.subject == KEY("ABCD", "NDARINVBBB"))
    assert sources.extract(bad, cfg) == (None, None)
    assert bad.error == "label file has 11 grayordinates, the image 9"


def test_abcd_cifti_lookup_orders_plain_names(abcd_root, tmp_path):
    """Label names that say nothing (AAL-like) are put in atlas order by the `atlas.lookup` table."""
    root, _data = abcd_root
    plain = {"7Networks_LH_Vis_1": "Ctx_A", "7Networks_RH_Default_1": "Ctx_B", "THA-DP-lh": "Thal_L",
             "THA-DP-rh": "Thal_R"}
    (tmp_path / "plain.tsv").write_text("label\n" + "\n".join(plain[LABEL_TABLE[k][0]] if k else "" for k in KEYS))
    pd.DataFrame({"label": ["Ctx_A", "Ctx_B", "Thal_L", "Thal_R"],
                  "network": ["Vis", "Default", "Subcortical", "Subcortical"]}
                 ).to_csv(tmp_path / "lookup.tsv", sep="\t", index=False)
    cfg = _cfg(4, cifti_labels=tmp_path / "plain.tsv", lookup=tmp_path / "lookup.tsv")
    rec = next(r for r in sources.discover(str(root), cfg, KEY) if r.subject == KEY("ABCD", "NDARINVAAA"))
    x, labels = sources.extract(rec, cfg)
    assert rec.error is None and x.shape == (T_OUT, 4)
    assert labels == ["Thal_L", "Thal_R", "Ctx_A", "Ctx_B"]


def test_abcd_cifti_needs_label_file(abcd_root, tmp_path):
    root, _data = abcd_root
    with pytest.raises(InputError, match="cifti_labels"):
        sources.discover(str(root), _cfg(4), KEY)
    with pytest.raises(InputError, match="not found"):
        sources.discover(str(root), _cfg(4, cifti_labels=tmp_path / "nope.dlabel.nii"), KEY)


# --- reference implementation HDF5 --------------------------------------------------------------------

def _reference_file(path, subjects, sessions, shapes):
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        for i, shape in enumerate(shapes):
            f[f"time_series/sample_{i}"] = _series(shape[1], 2.0, shape[0], seed=i).T   # ROI-major (N, T)
        f["metadata/subjects"] = np.array(subjects, dtype="S")
        f["metadata/sessions"] = np.array(sessions, dtype="S")


def test_reference_h5(tmp_path):
    root = tmp_path / "ref"
    hcp = root / "data" / "HCP" / "fmri" / "TianS3" / "data_resampled.h5"
    _reference_file(hcp, ["sub-A", "B", "C", "A"], ["1", "1", "1", "ses-1"],
                    [(450, 30), (449, 30), (450, 30), (450, 30)])
    pd.DataFrame({"participant_id": ["sub-A", "B"], "sex": ["M", "F"], "age": [30, "n/a"]}
                 ).to_csv(root / "data" / "HCP" / "participants.tsv", sep="\t", index=False)
    _reference_file(root / "data" / "ADNI" / "fmri" / "TianS3" / "data_resampled.h5", ["S1"], ["2"],
                    [(450, 30)])
    assert sources.detect(root) == "reference_h5"
    cfg = _cfg(450)
    results = _run(root, cfg)
    assert len(results) == 5

    a_runs = sorted(_by_subject(results, "HCP", "A"), key=lambda v: v[0].run)
    assert [(r.session, r.run) for r, _x, _l in a_runs] == [("1", "1"), ("1", "2")]
    rec, x, labels = a_runs[0]
    assert rec.error is None and rec.extra == {"h5": str(hcp), "sample": "sample_0"}
    assert x.shape == (T_OUT, 450) and labels == default_labels()
    assert rec.qc["original_tr"] == 2.0 and rec.qc["original_length"] == 30
    assert rec.phenotypes == {"sex": "M", "age": 30.0}
    np.testing.assert_allclose(sources.load_scan(rec, cfg).data, _series(30, 2.0, 450, seed=0))
    assert a_runs[1][0].extra["sample"] == "sample_3"

    [(bad, xb, _)] = _by_subject(results, "HCP", "B")
    assert xb is None and bad.error.startswith("sample_1 has shape (449, 30)")
    [(missing, xm, _)] = _by_subject(results, "HCP", "C")
    assert xm is None and missing.error == "sample_2: subject has no row in participants.tsv"
    [(adni, xa, _)] = _by_subject(results, "ADNI", "S1")
    assert adni.error is None and adni.session == "2" and adni.phenotypes == {} and xa.shape == (T_OUT, 450)


def test_detection_is_specific(tmp_path):
    """A tables root and an fMRIPrep CIFTI output are not taken for these layouts."""
    tables_root = tmp_path / "tables"
    func = tables_root / "sub-01" / "func"
    func.mkdir(parents=True)
    (tables_root / "participants.tsv").write_text("participant_id\tsex\nsub-01\tM\n")
    (func / "sub-01_task-rest_atlas-x_timeseries.tsv").write_text("a\tb\n1\t2\n")
    assert sources.detect(tables_root) == "tables"
    prep = tmp_path / "fmriprep" / "sub-01" / "func" / "sub-01_task-rest_space-fsLR_den-91k_bold.dtseries.nii"
    _dtseries(prep, n_vol=10)
    (tmp_path / "fmriprep" / "123").mkdir()
    for name, module in sources.SOURCES.items():
        if name in ("reference_h5", "ukb_csv", "abcd_cifti"):
            assert not module.matches(tables_root) and not module.matches(tmp_path / "fmriprep"), name
