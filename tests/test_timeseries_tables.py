"""Tables source + extraction: layout variants, every bad-input case as a failed row, privacy."""

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import zarr

from corpus_builder import sources
from corpus_builder.config import SourceConfig, SynthConfig
from corpus_builder.extraction import discover_all, extract_all
from corpus_builder.synth import synthesize
from fmrilm_core.errors import InputError
from tests.conftest import FMRILM, raw_id_hits


def cfg(length=32):
    c = SourceConfig()
    c.cleaning.length = length
    return c


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "cohort"
    participants = synthesize(SynthConfig(subjects=6, length_scale=0.3, datasets=["UKB", "ABCD", "ADNI"]), root)
    return root, participants


def series_files(root):
    return sorted(p for p in root.glob("sub-*/*/func/*_timeseries.npy"))


def test_synth_layout_and_participants(cohort):
    root, participants = cohort
    assert (root / "participants.tsv").is_file() and (root / "synth.json").is_file()
    assert list(participants.columns) == ["participant_id", "sex", "age", "fluid_intelligence", "diagnosis",
                                          "site", "dataset"]
    files = series_files(root)
    assert len(files) == 6
    tr = {json.loads(f.with_suffix(".json").read_text())["RepetitionTime"] for f in files}
    assert tr == {0.735, 0.8, 3.0}
    assert np.load(files[0]).shape[1] == 450


def test_extraction_gives_tr2_series_in_atlas_order(cohort, tmp_path):
    root, participants = cohort
    out = tmp_path / "ts"
    records = discover_all([str(root)], cfg())
    summary = extract_all(records, cfg(), out)
    assert summary["ok"] == 6 and summary["failed"] == 0
    group = zarr.open_group(out / "timeseries.zarr", mode="r")
    ts = group["ts"][:]
    assert ts.shape == (6, 32, 450) and ts.dtype == np.float32
    np.testing.assert_allclose(ts.mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(ts.std(1), 1, atol=1e-3)
    rois = pd.read_csv(out / "rois.tsv", sep="\t")
    assert list(rois["network"][:50].unique()) == ["Subcortical"]
    assert rois["label"][50] == "7Networks_LH_Vis_1"
    scans = pd.read_parquet(out / "scans.parquet")
    assert set(scans["qc_original_tr"]) == {0.735, 0.8, 3.0}
    assert list(group["keys"][:]) == scans.loc[scans["index"] >= 0].sort_values("index")["key"].tolist()
    assert set(scans["sex"]) <= {"M", "F"}


def test_raw_subject_ids_never_reach_outputs(cohort, tmp_path):
    root, participants = cohort
    out = tmp_path / "ts"
    extract_all(discover_all([str(root)], cfg()), cfg(), out)
    raw_ids = [pid.removeprefix("sub-") for pid in participants["participant_id"]]
    blob = (out / "scans.parquet").read_bytes() + json.dumps(
        list(zarr.open_group(out / "timeseries.zarr", mode="r")["keys"][:])).encode()
    assert not raw_id_hits(blob, raw_ids)


@pytest.mark.parametrize("fmt", ["tsv", "tsv.gz", "csv"])
def test_text_tables_read_like_npy(cohort, tmp_path, fmt):
    root, _ = cohort
    npy = series_files(root)[0]
    data = np.load(npy)
    labels = pd.read_csv(root / "atlas-TianS3Schaefer400_dseg.tsv", sep="\t")["name"].tolist()
    stem = npy.name[: -len(".npy")]
    pd.DataFrame(data, columns=labels).to_csv(npy.with_name(f"{stem}.{fmt}"), sep="," if fmt == "csv" else "\t",
                                              index=False)
    npy.unlink()
    records = {r.source_path.split("/")[-1]: r for r in sources.discover(str(root), cfg(), lambda d, s: s)}
    x_text, _ = sources.extract(records[f"{stem}.{fmt}"], cfg())
    np.save(npy, data)
    x_npy, _ = sources.extract(next(r for r in sources.discover(str(root), cfg(), lambda d, s: s)
                                    if r.source_path == str(npy)), cfg())
    np.testing.assert_allclose(x_text, x_npy, atol=1e-3)


def test_bad_scans_are_recorded(cohort, tmp_path):
    root, participants = cohort
    files = series_files(root)
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    table[table["participant_id"] != files[0].name.split("_")[0]].to_csv(root / "participants.tsv", sep="\t",
                                                                          index=False)
    files[1].with_suffix(".json").write_text("{}")
    np.save(files[2], np.load(files[2])[:, :400])
    x = np.load(files[3]); x[5, 60] = np.nan; np.save(files[3], x)
    x = np.load(files[4]); x[:, :200] = 0; np.save(files[4], x)
    out = tmp_path / "ts"
    summary = extract_all(discover_all([str(root)], cfg()), cfg(), out)
    assert summary["ok"] == 1 and summary["failed"] == 5
    scans = pd.read_parquet(out / "scans.parquet")
    assert len(scans) == 6 and (scans["status"] == "failed").sum() == 5
    reasons = scans["error"].dropna().tolist()
    assert any("subject has no row in participants.tsv" in e for e in reasons)
    assert any("RepetitionTime" in e for e in reasons)
    assert any("400 columns but 450 ROI labels" in e for e in reasons)
    assert any("non-finite" in e for e in reasons)
    assert any("constant" in e for e in reasons)
    assert all("\n" not in e for e in reasons)
    assert all(str(root) not in e for e in reasons)  # paths (raw ids) stay out of the manifest
    assert sum(str(f) in " ".join(summary["failures"]) for f in files[:5]) == 5
    assert zarr.open_group(out / "timeseries.zarr", mode="r")["ts"].shape == (1, 32, 450)


def test_corrupt_file_is_a_failed_record(cohort):
    root, _ = cohort
    f = series_files(root)[0]
    f.write_bytes(f.read_bytes()[:300])
    rec = next(r for r in sources.discover(str(root), cfg(), lambda d, s: s) if r.source_path == str(f))
    assert sources.extract(rec, cfg()) == (None, None)
    assert rec.error.startswith("unreadable") and "\n" not in rec.error


def test_too_short_scan_skip_or_pad(cohort):
    root, _ = cohort
    rec = sources.discover(str(root), cfg(), lambda d, s: s)[0]
    c = cfg(length=200)
    c.cleaning.too_short = "skip"
    assert sources.extract(rec, c) == (None, None) and "too short" in rec.error


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_all([str(tmp_path / "nope")], cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no known source layout"):
        discover_all([str(tmp_path / "empty")], cfg())


def test_real_source_without_secret_is_refused(cohort):
    root, _ = cohort
    (root / ".pseudonym_key").unlink()
    with pytest.raises(InputError, match="FMRILM_PSEUDONYM_KEY"):
        discover_all([str(root)], cfg())


def test_cli_timeseries_bad_source_exit_2(tmp_path):
    proc = subprocess.run([*FMRILM, "corpus", "timeseries", "--source", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: source does not exist"]
