"""Raw ROI series -> the clean `X[T, N]` every later stage consumes (docs/design.md).

Order of operations, and why:
1. checks (ROI count, non-finite values, constant ROIs) so a bad scan fails with a reason, not NaNs later;
2. confound regression, detrending and high-pass with nilearn's `signal.clean` at the *native* TR
   (confounds are sampled on the native grid);
3. censoring: high-motion volumes are dropped from the regression fit and linearly interpolated over, so
   the series stays on a regular grid for resampling;
4. anti-aliased resampling to TR 2.0 s with a polyphase FIR (`scipy.signal.resample_poly`, rational factor
   such as 147/400 for UKB's 0.735 s) - plain interpolation would alias 0.2-0.7 Hz power into the band;
5. centre crop (or interpolation) to T volumes; scans too short are skipped or padded, as configured;
6. per-ROI z-scoring; then columns are put in atlas order (Tian subcortical first, then cortex).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
from nilearn import signal as nsignal
from scipy.interpolate import interp1d
from scipy.signal import resample, resample_poly

from corpus_builder.atlas import atlas_order
from corpus_builder.config import CleaningConfig
from corpus_builder.records import RawScan, ScanError

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def select_confounds(table: pd.DataFrame, cfg: CleaningConfig) -> pd.DataFrame:
    """Confound regressors by strategy, as nilearn's `load_confounds` names them (fMRIPrep columns).

    Derivative / squared motion terms missing from the table are computed from the base parameters.
    Raises ScanError when a requested column is not in the table.
    """
    table = table.apply(pd.to_numeric, errors="coerce")
    out: dict[str, pd.Series] = {}
    if "motion" in cfg.confounds:
        missing = [c for c in MOTION if c not in table]
        if missing:
            raise ScanError(f"confounds table lacks {', '.join(missing)}")
        for col in MOTION:
            base = table[col].fillna(0.0)
            deriv = table.get(f"{col}_derivative1", base.diff()).fillna(0.0)
            out[col] = base
            if cfg.motion in ("derivatives", "full"):
                out[f"{col}_derivative1"] = deriv
            if cfg.motion in ("power2", "full"):
                out[f"{col}_power2"] = base ** 2
            if cfg.motion == "full":
                out[f"{col}_derivative1_power2"] = deriv ** 2
    wanted = []
    if "wm_csf" in cfg.confounds:
        wanted += ["white_matter", "csf"]
    if "global_signal" in cfg.confounds:
        wanted += ["global_signal"]
    if "compcor" in cfg.confounds:
        comps = sorted(c for c in table if c.startswith("a_comp_cor_"))[:10]
        if not comps:
            raise ScanError("confounds table lacks a_comp_cor_* columns")
        wanted += comps
    missing = [c for c in wanted if c not in table]
    if missing:
        raise ScanError(f"confounds table lacks {', '.join(missing)}")
    for col in wanted:
        out[col] = table[col].fillna(0.0)
    return pd.DataFrame(out)


def resample_to_tr(x: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """Anti-aliased resampling of [T, N] series from `tr_in` to `tr_out` seconds (polyphase FIR)."""
    if abs(tr_in - tr_out) < 1e-6:
        return x
    frac = Fraction(tr_in / tr_out).limit_denominator(1000)
    return resample_poly(x, frac.numerator, frac.denominator, axis=0, padtype="line")


def _fit_length(x: np.ndarray, cfg: CleaningConfig, qc: dict) -> np.ndarray:
    n, target = x.shape[0], cfg.length
    if n >= target:
        if n > target and cfg.too_long == "interpolate":
            qc["effective_tr"] = cfg.tr * n / target
            return resample(x, target, axis=0)
        start = (n - target) // 2 if cfg.crop == "centre" else 0
        return x[start:start + target]
    if cfg.too_short == "skip" or n < cfg.min_length_fraction * target:
        raise ScanError(f"too short: {n} volumes at TR {cfg.tr} s after resampling, need {target}")
    qc["padded_volumes"] = target - n
    return np.vstack([x, np.zeros((target - n, x.shape[1]), x.dtype)])


def clean_scan(raw: RawScan, cfg: CleaningConfig, n_rois: int | None = None,
               networks: dict[str, str] | None = None) -> tuple[np.ndarray, list[str], dict]:
    """Clean one scan. Returns (X [T, N] float32 in atlas order, labels in that order, QC values).

    `networks` (label -> network) orders atlases whose label names do not say which ROIs are subcortical.

    Raises ScanError with a one-line reason (without the file name; the caller adds it).
    """
    data = np.asarray(raw.data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(raw.labels):
        raise ScanError(f"expected [T, N] with N = {len(raw.labels)} labels, got shape {data.shape}")
    n_vol, n = data.shape
    if n_rois is not None and n != n_rois:
        raise ScanError(f"has {n} ROIs, expected {n_rois}")
    if not raw.tr or raw.tr <= 0:
        raise ScanError("missing or invalid repetition time")
    bad = ~np.isfinite(data)
    if bad.any():
        roi = raw.labels[int(np.argmax(bad.any(0)))]
        raise ScanError(f"{int(bad.sum())} non-finite values (first in ROI {roi!r})")
    if n_vol < 8:
        raise ScanError(f"only {n_vol} volumes")
    constant = data.std(0) <= 1e-8 * (np.abs(data).mean(0) + 1.0)
    qc: dict = {"original_tr": float(raw.tr), "original_length": int(n_vol),
                "constant_roi_fraction": float(constant.mean()), "raw_mean": float(data.mean()),
                "raw_std": float(data.std())}
    if constant.mean() > cfg.max_constant_roi_fraction:
        raise ScanError(f"{int(constant.sum())} of {n} ROIs are constant")

    confounds = None
    keep = np.ones(n_vol, bool)
    if raw.confounds is not None:
        if len(raw.confounds) != n_vol:
            raise ScanError(f"confounds have {len(raw.confounds)} rows, the series {n_vol} volumes")
        if "framewise_displacement" in raw.confounds:
            fd = pd.to_numeric(raw.confounds["framewise_displacement"], errors="coerce").fillna(0.0).to_numpy()
            qc["mean_fd"] = float(fd.mean())
            if cfg.censor_fd is not None:
                keep = fd <= cfg.censor_fd
                qc["censored_fraction"] = float(1 - keep.mean())
                if keep.sum() < max(8, n_vol // 4):
                    raise ScanError(f"{int((~keep).sum())} of {n_vol} volumes above FD {cfg.censor_fd} mm")
        if cfg.confounds:
            confounds = select_confounds(raw.confounds, cfg).to_numpy()
            qc["n_confounds"] = int(confounds.shape[1])

    live = data[:, ~constant]
    cleaned = nsignal.clean(live, confounds=confounds, detrend=cfg.detrend, standardize=None,
                            high_pass=cfg.high_pass, t_r=raw.tr, sample_mask=None if keep.all() else keep)
    if not keep.all():  # back onto the full grid, linearly through the censored volumes
        t = np.arange(n_vol)
        cleaned = interp1d(t[keep], cleaned, axis=0, bounds_error=False,
                           fill_value=(cleaned[0], cleaned[-1]))(t)
    x = np.zeros_like(data)
    x[:, ~constant] = cleaned

    x = resample_to_tr(x, raw.tr, cfg.tr)
    x = _fit_length(x, cfg, qc)
    if cfg.zscore:  # over the real volumes only; padding stays 0 = the ROI's mean
        real = x[: cfg.length - qc.get("padded_volumes", 0)]
        std = real.std(0)
        real[:] = np.divide(real - real.mean(0), std, out=np.zeros_like(real), where=std > 1e-12)
    order = atlas_order(list(raw.labels), networks)
    return x[:, order].astype(np.float32), [raw.labels[i] for i in order], qc
