"""fMRIPrep, UK Biobank and ABCD NIfTI sources end to end (`sources.discover` + `sources.extract`) on tiny
fixture trees, the UKB field table, and the synthetic NIfTI cohort through the fmriprep source."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from corpus_builder import sources
from corpus_builder.atlas import roi_table
from corpus_builder.config import AtlasConfig, CleaningConfig, SourceConfig, SynthConfig, UKBConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.records import RawScan
from corpus_builder.roi_timeseries import clean_scan
from corpus_builder.sources.ukb_fields import canonical_field, read_ukb_fields
from corpus_builder.synth_nifti import CORTICAL, SUBCORTICAL, atlas_config, write_nifti_cohort
from fmrilm_core.errors import InputError

KEY = Pseudonymizer(b"test-secret-0123456789")
GRID = (6, 6, 6)
TIAN = ["HIP-head-m-rh", "HIP-head-m-lh"]
SCHAEFER = ["7Networks_LH_Vis_1", "7Networks_LH_Default_1", "7Networks_RH_Vis_1", "7Networks_RH_Default_1"]
LABELS = TIAN + SCHAEFER


def _affine(voxel: float = 4.0) -> np.ndarray:
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -10.0
    return affine


def _parcels() -> list[np.ndarray]:
    """Masks of the 6 parcels in atlas order: 2 central (Tian), 4 in the outer layer (Schaefer)."""
    x, y, _ = np.indices(GRID)
    core = np.zeros(GRID, bool)
    core[2:4, 2:4, 2:4] = True
    shell = ~core
    return [core & (x >= 3), core & (x < 3),
            shell & (x < 3) & (y < 3), shell & (x < 3) & (y >= 3),
            shell & (x >= 3) & (y < 3), shell & (x >= 3) & (y >= 3)]


def _write_atlas(folder: Path) -> AtlasConfig:
    """Two atlas images on GRID with Tian / Schaefer names and label tables in their shipped formats."""
    folder.mkdir(parents=True, exist_ok=True)
    masks = _parcels()
    tian, schaefer = np.zeros(GRID, np.int16), np.zeros(GRID, np.int16)
    for value, mask in enumerate(masks[:2], 1):
        tian[mask] = value
    for value, mask in enumerate(masks[2:], 1):
        schaefer[mask] = value
    nib.save(nib.Nifti1Image(tian, _affine()), folder / "tian.nii.gz")
    nib.save(nib.Nifti1Image(schaefer, _affine()), folder / "schaefer.nii.gz")
    (folder / "tian_label.txt").write_text("\n".join(TIAN) + "\n")
    (folder / "schaefer_order.txt").write_text(
        "".join(f"{i}\t{name}\t10\t20\t30\t0\n" for i, name in enumerate(SCHAEFER, 1)))
    return AtlasConfig(images=[folder / "tian.nii.gz", folder / "schaefer.nii.gz"],
                       labels=[folder / "tian_label.txt", folder / "schaefer_order.txt"], n_rois=len(LABELS))


def _series(n_vol: int, tr: float, seed: int) -> np.ndarray:
    """[n_vol, 6] distinct slow series around 1000 (each parcel its own)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_vol)[:, None] * tr
    periods = np.array([20.0, 25.0, 30.0, 40.0, 50.0, 60.0])
    return 1000 + 10 * np.sin(2 * np.pi * t / periods + rng.uniform(0, 6, 6)) + rng.normal(0, 1, (n_vol, 6))


def _write_bold(path: Path, series: np.ndarray, tr: float, voxel: float = 4.0, grid=GRID) -> None:
    data = np.zeros((*grid, series.shape[0]), np.float32)
    if grid == GRID:
        for p, mask in enumerate(_parcels()):
            data[mask] = series[:, p]
    img = nib.Nifti1Image(data, _affine(voxel))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((voxel, voxel, voxel, tr))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _confounds(n_vol: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter", "csf"]
    table = pd.DataFrame(np.cumsum(rng.normal(0, 0.01, (n_vol, len(cols))), 0), columns=cols)
    table["framewise_displacement"] = np.abs(rng.normal(0, 0.1, n_vol))
    return table


def _cfg(atlas: AtlasConfig, length: int = 160, **kw) -> SourceConfig:
    return SourceConfig(atlas=atlas, cleaning=CleaningConfig(length=length), **kw)


def _run(root: Path, cfg: SourceConfig) -> dict:
    """raw subject id -> list of (record, x, labels)."""
    out: dict = {}
    for record in sources.discover(str(root), cfg, KEY):
        x, labels = sources.extract(record, cfg)
        out.setdefault(record.subject, []).append((record, x, labels))
    return out


def _expected(series, tr, cfg, confounds=None) -> np.ndarray:
    x, labels, _ = clean_scan(RawScan(series, LABELS, tr, confounds), cfg.cleaning, cfg.atlas.n_rois)
    assert labels == LABELS
    return x


def _check(record, x, labels, tr) -> None:
    assert record.error is None, record.error
    assert x.shape == (160, len(LABELS)) and x.dtype == np.float32 and np.isfinite(x).all()
    assert labels == LABELS                               # Tian (subcortical) first, then Schaefer
    assert record.qc["original_tr"] == pytest.approx(tr)


def test_fmriprep_source(tmp_path):
    bids = tmp_path / "bids"
    root = bids / "derivatives" / "fmriprep"
    cfg = _cfg(_write_atlas(tmp_path / "atlas"))
    bids.mkdir()                                  # participants.tsv of the BIDS dataset above derivatives/
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "sex": ["F", "M"], "age": [30, 41.5],
                  "site": ["A", "B"]}).to_csv(bids / "participants.tsv", sep="\t", index=False)
    series = {s: _series(160, 2.0, i) for i, s in enumerate(["01", "02", "03"])}
    conf = {s: _confounds(160, i) for i, s in enumerate(series)}
    func = root / "sub-01" / "ses-1" / "func"
    stem = "sub-01_ses-1_task-rest_run-1"
    _write_bold(func / f"{stem}_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz", series["01"],
                tr=3.0)                                                        # header TR wrong: sidecar wins
    sidecar = func / f"{stem}_space-MNI152NLin6Asym_desc-preproc_bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 2.0}))
    conf["01"].to_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False)
    _write_bold(func / "sub-01_ses-1_task-nback_run-1_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz",
                series["01"], tr=2.0)                                          # not rest: ignored
    func = root / "sub-02" / "func"                                  # no session; two spaces, no sidecar
    _write_bold(func / "sub-02_task-rest_space-T1w_desc-preproc_bold.nii.gz", series["02"], 2.0, voxel=3.0,
                grid=(5, 5, 5))
    _write_bold(func / "sub-02_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz", series["02"],
                2.0)
    conf["02"].to_csv(func / "sub-02_task-rest_desc-confounds_timeseries.tsv", sep="\t", index=False)
    func = root / "sub-03" / "func"                                            # no participants row
    _write_bold(func / "sub-03_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz", series["03"], 2.0)
    conf["03"].to_csv(func / "sub-03_task-rest_desc-confounds_timeseries.tsv", sep="\t", index=False)

    assert sources.detect(root) == "fmriprep"
    out = _run(root, cfg)
    assert len(out) == 3 and all(len(v) == 1 for v in out.values())
    for sid, tr in (("01", 2.0), ("02", 2.0)):
        record, x, labels = out[KEY("bids", sid)][0]
        _check(record, x, labels, tr)
        np.testing.assert_allclose(x, _expected(series[sid], tr, cfg, conf[sid]), atol=2e-3)
        assert record.qc["n_confounds"] == 26
    r1, r2 = out[KEY("bids", "01")][0][0], out[KEY("bids", "02")][0][0]
    assert (r1.dataset, r1.session, r1.run, r1.site) == ("bids", "1", "1", "A")
    assert r1.phenotypes == {"sex": "F", "age": 30.0}
    assert r2.extra["space"] == "MNI152NLin2009cAsym"                         # the one on the atlas grid
    failed = out[KEY("bids", "03")][0]
    assert failed[1] is None and failed[0].error == "subject has no row in participants.tsv"


def test_fmriprep_missing_confounds_fails_the_scan(tmp_path):
    root = tmp_path / "prep"
    cfg = _cfg(_write_atlas(tmp_path / "atlas"))
    root.mkdir()
    pd.DataFrame({"participant_id": ["sub-01"]}).to_csv(root / "participants.tsv", sep="\t", index=False)
    _write_bold(root / "sub-01/func/sub-01_task-rest_desc-preproc_bold.nii.gz", _series(160, 2.0, 0), 2.0)
    (record,) = sources.discover(str(root), cfg, KEY)
    assert "no desc-confounds_timeseries.tsv" in record.error
    cfg.cleaning.confounds = []
    (record,) = sources.discover(str(root), cfg, KEY)
    _check(record, *sources.extract(record, cfg), tr=2.0)


def test_missing_or_wrong_atlas_stops_discovery(tmp_path):
    root = tmp_path / "ukb"
    _write_bold(root / "1000001" / "fMRI" / "rfMRI.ica" / "filtered_func_data_clean.nii.gz",
                _series(20, 0.735, 0), 0.735)
    with pytest.raises(InputError, match="atlas.images"):
        sources.discover(str(root), SourceConfig(), KEY)
    atlas = _write_atlas(tmp_path / "atlas")
    atlas.n_rois = 450
    with pytest.raises(InputError, match="6 labels but atlas.n_rois is 450"):
        sources.discover(str(root), _cfg(atlas), KEY)


def test_ukb_folders_with_field_table(tmp_path):
    root = tmp_path / "ukb"
    series = {eid: _series(440, 0.735, i) for i, eid in enumerate(["1000001", "1000002", "1000003"])}
    ica = Path("fMRI") / "rfMRI.ica"
    mni, native = "filtered_func_data_clean_MNI152.nii.gz", "filtered_func_data_clean.nii.gz"
    _write_bold(root / "1000001_20227_2_0" / ica / mni, series["1000001"], 0.735)
    _write_bold(root / "1000001_20227_2_0" / ica / native, series["1000001"], 0.735, voxel=2.4,
                grid=(5, 5, 5))                                               # native space: not used
    _write_bold(root / "1000002" / ica / native, series["1000002"], 0.735)
    _write_bold(root / "1000003_20227_2_0" / ica / mni, series["1000003"], 0.735)
    (root / "1000004_20227_2_0" / "fMRI").mkdir(parents=True)                # no scan: not a record
    (root / "notes.txt").write_text("x")
    fields = tmp_path / "ukb_fields.csv"
    pd.DataFrame({"eid": [1000001, 1000002, 1000009], "31-0.0": [0, 1, 1], "21003-2.0": [61, 55.5, 70],
                  "20016-2.0": [7, None, 5]}).to_csv(fields, index=False)
    cfg = _cfg(_write_atlas(tmp_path / "atlas"), ukb=UKBConfig(phenotypes=fields))

    assert sources.detect(root) == "ukb_nifti"
    out = _run(root, cfg)
    assert len(out) == 3
    for eid in ("1000001", "1000002"):
        record, x, labels = out[KEY("UKB", eid)][0]
        _check(record, x, labels, 0.735)
        assert (record.dataset, record.session, record.run) == ("UKB", "2", "1")
        np.testing.assert_allclose(x, _expected(series[eid], 0.735, cfg), atol=2e-3)
    assert out[KEY("UKB", "1000001")][0][0].phenotypes == {"sex": "F", "age": 61.0, "fluid_intelligence": 7.0}
    assert out[KEY("UKB", "1000001")][0][0].source_path.endswith("_MNI152.nii.gz")
    assert out[KEY("UKB", "1000002")][0][0].phenotypes == {"sex": "M", "age": 55.5}
    failed = out[KEY("UKB", "1000003")][0]
    assert failed[1] is None and "no row in the UKB field table" in failed[0].error
    assert "1000003" not in failed[0].error                                   # no raw ids in errors

    cfg.ukb.phenotypes = None                                   # no table: no phenotypes, no failures
    records = sources.discover(str(root), cfg, KEY)
    assert [r.error for r in records] == [None] * 3 and all(r.phenotypes == {} for r in records)


def test_read_ukb_fields_export_styles(tmp_path):
    path = tmp_path / "rap.tsv"
    pd.DataFrame({"participant.eid": ["11", "12"], "p31": ["Female", "1"], "p21003_i2": ["50", "60"],
                  "p21003_i3": ["52", ""], "p20016_i2": ["6", "n/a"]}).to_csv(path, sep="\t", index=False)
    cfg = UKBConfig()
    assert read_ukb_fields(path, cfg) == {"11": {"sex": "F", "age": 50.0, "fluid_intelligence": 6.0},
                                          "12": {"sex": "M", "age": 60.0}}
    at3 = read_ukb_fields(path, cfg, instance="3")                           # repeat-imaging visit
    assert at3["11"]["age"] == 52.0 and "age" not in at3["12"]
    assert canonical_field("f.31.0.0") == canonical_field("p31_i0") == "31-0.0"


def test_abcd_mni_source(tmp_path):
    root = tmp_path / "abcd"
    sid, ses = "NDARINVAAAA1111", "baselineYear1Arm1"
    series = {run: _series(400, 0.8, i) for i, run in enumerate(["01", "02"])}
    func = root / f"sub-{sid}" / f"ses-{ses}" / "func"
    for run, s in series.items():
        stem = f"sub-{sid}_ses-{ses}_task-rest_run-{run}_space-MNI_bold"
        _write_bold(func / f"{stem}.nii.gz", s, tr=1.0)                       # header TR wrong: sidecar wins
        (func / f"{stem}.json").write_text(json.dumps({"RepetitionTime": 0.8}))
    cfg = _cfg(_write_atlas(tmp_path / "atlas"))

    assert sources.detect(root) == "abcd_nifti"
    (scans,) = _run(root, cfg).values()                                     # one subject, two runs
    assert [(r.dataset, r.session, r.run) for r, _, _ in scans] == [("ABCD", ses, "01"), ("ABCD", ses, "02")]
    for (record, x, labels), s in zip(scans, series.values()):
        _check(record, x, labels, 0.8)
        assert record.phenotypes == {}
        np.testing.assert_allclose(x, _expected(s, 0.8, cfg), atol=2e-3)

    # with a per-session participants table, phenotypes follow the session; a missing subject fails
    table = pd.DataFrame({"participant_id": [f"sub-{sid}", f"sub-{sid}"],
                          "session_id": ["ses-2YearFollowUpYArm1", f"ses-{ses}"], "sex": ["2", "2"],
                          "age": [12.0, 10.1]})
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    records = sources.discover(str(root), cfg, KEY)
    assert [r.phenotypes for r in records] == [{"sex": "F", "age": 10.1}] * 2
    other = table.assign(participant_id="sub-NDARINVBBBB2222")
    other.to_csv(root / "participants.tsv", sep="\t", index=False)
    records = sources.discover(str(root), cfg, KEY)
    assert all(r.error == "subject has no row in participants.tsv" for r in records)


def test_synth_nifti_cohort_round_trips(tmp_path):
    root = tmp_path / "synth"
    synth = SynthConfig(subjects=3, datasets=["UKB", "ABCD", "ADHD200"], length_scale=0.4)
    participants = write_nifti_cohort(synth, root)
    cfg = _cfg(atlas_config(root), length=60)
    assert json.loads((root / "synth.json").read_text())["atlas"]["n_rois"] == 14
    assert sources.detect(root) == "fmriprep"
    records = sources.discover(str(root), cfg, Pseudonymizer.for_synthetic(root))
    assert sorted(r.dataset for r in records) == ["ABCD", "ADHD200", "UKB"]
    by_dataset = participants.set_index("dataset")
    for record in records:
        x, labels = sources.extract(record, cfg)
        assert record.error is None, record.error
        assert x.shape == (60, 14) and np.isfinite(x).all()
        assert labels == list(SUBCORTICAL + CORTICAL)
        assert set(roi_table(labels)["network"][:2]) == {"Subcortical"}
        row = by_dataset.loc[record.dataset]
        assert record.phenotypes["sex"] == row["sex"]
        assert record.phenotypes["age"] == pytest.approx(row["age"])
        assert record.qc["n_confounds"] == 26
