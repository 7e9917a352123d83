"""Anti-aliased resampling to TR 2.0 s, and the checks / padding / censoring / ordering of `clean_scan`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.interpolate import interp1d
from scipy.signal import periodogram

from corpus_builder.atlas import schaefer400_labels, tian_s3_labels
from corpus_builder.config import CleaningConfig
from corpus_builder.records import RawScan, ScanError
from corpus_builder.roi_timeseries import clean_scan, resample_to_tr

TR_UKB, TR_OUT, N_VOL = 0.735, 2.0, 600   # 441 s of UKB-like data -> 221 volumes at TR 2.0


def sine(freq: float, n: int = N_VOL, tr: float = TR_UKB) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(n) * tr)


def naive(x: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """Linear interpolation onto the new grid, no low-pass: what resample_to_tr must not do."""
    t_in = np.arange(len(x)) * tr_in
    return interp1d(t_in, x, axis=0)(np.arange(int(t_in[-1] // tr_out) + 1) * tr_out)


def peak(x: np.ndarray, tr: float) -> tuple[float, float, float]:
    """Frequency of the periodogram peak, the bin width, and the power in 0.01-0.25 Hz."""
    f, p = periodogram(x, fs=1 / tr, detrend="constant")
    band = (f > 0.01) & (f < 0.25)
    return float(f[np.argmax(p)]), float(f[1] - f[0]), float(p[band].sum())


def test_slow_sinusoid_keeps_its_frequency_and_amplitude():
    y = resample_to_tr(sine(0.05)[:, None], TR_UKB, TR_OUT)
    assert y.shape == (221, 1)
    f_peak, df, _ = peak(y[:, 0], TR_OUT)
    assert abs(f_peak - 0.05) <= df
    assert y[10:-10, 0].std() == pytest.approx(np.sqrt(0.5), rel=0.03)


def test_fast_component_is_attenuated_not_aliased():
    """0.6 Hz is above the new Nyquist (0.25 Hz): linear interpolation folds it to |0.6 - 0.5| = 0.1 Hz."""
    fast = sine(0.6)
    lin = naive(fast, TR_UKB, TR_OUT)
    f_lin, df, band_lin = peak(lin, TR_OUT)
    assert abs(f_lin - 0.1) <= df and lin.std() > 0.3  # the alias, with most of the power
    fir = resample_to_tr(fast[:, None], TR_UKB, TR_OUT)[:, 0]
    _, _, band_fir = peak(fir, TR_OUT)
    assert fir.std() < 0.05                             # measured 0.02 (edges), vs 0.42 for linear
    assert band_fir < 0.01 * band_lin
    # mixed: the slow part survives, the fast part does not leak into the band
    both = resample_to_tr((sine(0.05) + sine(0.6))[:, None], TR_UKB, TR_OUT)[:, 0]
    slow = resample_to_tr(sine(0.05)[:, None], TR_UKB, TR_OUT)[:, 0]
    assert np.abs(both - slow)[5:-5].max() < 0.05


def test_same_tr_is_identity():
    x = np.random.default_rng(0).standard_normal((50, 3))
    assert resample_to_tr(x, 2.0, 2.0) is x


# --- clean_scan -----------------------------------------------------------------------------------


def cleaning(**kw) -> CleaningConfig:
    return CleaningConfig(**{"length": 40, "confounds": [], **kw})


def scan(n_vol: int = 48, n: int = 20, tr: float = 2.0, seed: int = 0, labels=None, confounds=None) -> RawScan:
    rng = np.random.default_rng(seed)
    labels = labels or [f"7Networks_LH_Vis_{i + 1}" for i in range(n)]
    data = 1000 + 10 * rng.standard_normal((n_vol, len(labels))) * rng.uniform(0.5, 2, len(labels))
    return RawScan(data=data, labels=list(labels), tr=tr, confounds=confounds)


def test_nan_roi_fails():
    raw = scan()
    raw.data[5, 3] = np.nan
    with pytest.raises(ScanError, match="non-finite.*7Networks_LH_Vis_4"):
        clean_scan(raw, cleaning())


def test_too_many_constant_rois_fail():
    raw = scan()
    raw.data[:, [1, 2, 3]] = 0.0                # 3 of 20 = 15% > 10%
    with pytest.raises(ScanError, match="3 of 20 ROIs are constant"):
        clean_scan(raw, cleaning())
    raw = scan()
    raw.data[:, 1] = 0.0                         # 1 of 20 = 5%: kept, the ROI stays all zero
    x, _, qc = clean_scan(raw, cleaning())
    assert qc["constant_roi_fraction"] == 0.05 and np.all(x[:, 1] == 0) and np.isfinite(x).all()


def test_wrong_roi_count_fails():
    with pytest.raises(ScanError, match="has 20 ROIs, expected 94"):
        clean_scan(scan(), cleaning(), n_rois=94)


def test_too_short_skip_fails_and_pad_pads():
    raw = scan(n_vol=36)                         # 36 < 40 but >= 0.8 * 40
    with pytest.raises(ScanError, match="too short: 36 volumes"):
        clean_scan(raw, cleaning(too_short="skip"))
    x, _, qc = clean_scan(raw, cleaning(too_short="pad"))
    assert x.shape == (40, 20) and qc["padded_volumes"] == 4
    assert np.all(x[-4:] == 0) and np.all(x[:-4].std(0) > 0.5)
    np.testing.assert_allclose(x[:-4].mean(0), 0, atol=1e-5)   # z-scored over the real volumes
    np.testing.assert_allclose(x[:-4].std(0), 1, atol=1e-4)
    with pytest.raises(ScanError, match="too short: 30 volumes"):   # below min_length_fraction: always fails
        clean_scan(scan(n_vol=30), cleaning(too_short="pad"))


def test_censoring_records_fraction():
    n_vol = 60
    rng = np.random.default_rng(1)
    fd = rng.uniform(0.05, 0.2, n_vol)
    fd[[10, 11, 30, 45, 46, 47]] = 1.5           # 6 of 60 volumes above 0.5 mm
    motion = pd.DataFrame(rng.normal(0, 0.1, (n_vol, 6)),
                          columns=["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"])
    motion["framewise_displacement"] = fd
    motion.loc[0, "framewise_displacement"] = np.nan   # as fMRIPrep writes it (read as 0)
    raw = scan(n_vol=n_vol, confounds=motion)
    x, _, qc = clean_scan(raw, cleaning(censor_fd=0.5, confounds=["motion"], motion="basic"))
    assert qc["censored_fraction"] == pytest.approx(0.1)
    assert qc["n_confounds"] == 6 and qc["mean_fd"] == pytest.approx(fd[1:].sum() / n_vol)
    assert x.shape == (40, 20) and np.isfinite(x).all()
    _, _, qc = clean_scan(raw, cleaning(confounds=["motion"], motion="basic"))
    assert "censored_fraction" not in qc         # no censoring unless censor_fd is set
    raw.confounds["framewise_displacement"] = 2.0  # everything above: too few volumes left
    with pytest.raises(ScanError, match="above FD 0.5 mm"):
        clean_scan(raw, cleaning(censor_fd=0.5))


def test_output_zscored_in_atlas_order_subcortical_first():
    cortex, tian = schaefer400_labels()[:6], tian_s3_labels()[:3]
    labels = [cortex[0], tian[0], cortex[1], cortex[2], tian[1], cortex[3], tian[2], cortex[4], cortex[5]]
    raw = scan(n_vol=100, labels=labels, tr=0.8)
    x, out_labels, qc = clean_scan(raw, cleaning(length=32))
    assert out_labels == tian + cortex
    assert x.shape == (32, 9) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    assert qc["original_tr"] == 0.8 and qc["original_length"] == 100
    # the columns move with their labels: each output column is its input ROI, cleaned
    x_same, _, _ = clean_scan(RawScan(raw.data[:, [1, 4, 6, 0, 2, 3, 5, 7, 8]], tian + cortex, 0.8),
                              cleaning(length=32))
    np.testing.assert_allclose(x, x_same, atol=1e-5)
    # a lookup decides for names that say nothing (AAL2): subcortical by the table, first
    aal = ["Precentral_L", "Thalamus_L", "Frontal_Mid_2_L", "Caudate_R"]
    networks = {"Precentral_L": "SomMot", "Thalamus_L": "Subcortical", "Frontal_Mid_2_L": "Cont",
                "Caudate_R": "Subcortical"}
    _, plain, _ = clean_scan(scan(labels=aal), cleaning())
    assert plain == aal
    _, ordered, _ = clean_scan(scan(labels=aal), cleaning(), networks=networks)
    assert ordered == ["Thalamus_L", "Caudate_R", "Precentral_L", "Frontal_Mid_2_L"]
