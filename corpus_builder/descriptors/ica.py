"""Network fALFF from a group ICA fitted once on the reference cohort.

Group ICA in ROI space: the reference scans' series are concatenated in time and FastICA finds spatially
independent maps over ROIs (ROIs are the samples). Each Yeo-7 network keeps the component whose map overlaps
it most. Per scan, dual regression's first stage gives the component time courses (least squares of the
scan on the group maps); fALFF = amplitude in the low-frequency band / amplitude over all frequencies, on
series that were not band-passed (the corpus only high-passes at 0.008 Hz).
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import FastICA

from corpus_builder.atlas import YEO7

ICA_NAMES = tuple(f"falff_{net}" for net in YEO7)


def fit_group_ica(series: list[np.ndarray], networks: np.ndarray, n_components: int = 20,
                  seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Group ICA maps [7, N], one per Yeo network (sign: positive on that network), and the networks."""
    data = np.concatenate([s - s.mean(0) for s in series], axis=0)  # [sum T, N]
    n_components = min(n_components, data.shape[0] - 1, data.shape[1] - 1)
    ica = FastICA(n_components=n_components, whiten="unit-variance", random_state=seed, max_iter=1000)
    maps = ica.fit_transform(data.T).T  # ROIs as samples -> [K, N] spatial maps
    maps /= np.linalg.norm(maps, axis=1, keepdims=True)
    chosen, used = [], set()
    for net in YEO7:
        member = (networks == net).astype(float)
        if member.sum() == 0:
            chosen.append(np.zeros(maps.shape[1]))
            continue
        member /= np.linalg.norm(member)
        overlap = maps @ member
        order = np.argsort(-np.abs(overlap))
        k = next((i for i in order if i not in used), order[0])
        used.add(k)
        chosen.append(maps[k] * np.sign(overlap[k]))
    return np.stack(chosen), list(YEO7)


def falff(ts: np.ndarray, tr: float, band: tuple[float, float]) -> np.ndarray:
    """fALFF of each column of [T, K]: sum of amplitude spectrum in `band` / sum over (0, Nyquist]."""
    ts = ts - ts.mean(0)
    amp = np.abs(np.fft.rfft(ts, axis=0))[1:]
    freqs = np.fft.rfftfreq(len(ts), tr)[1:]
    low = (freqs >= band[0]) & (freqs <= band[1])
    total = amp.sum(0)
    return np.divide(amp[low].sum(0), total, out=np.full(ts.shape[1], np.nan), where=total > 0)


def ica_descriptors(x: np.ndarray, maps: np.ndarray, valid: np.ndarray, networks: np.ndarray, tr: float,
                    band: tuple[float, float]) -> tuple[dict, dict]:
    duration = len(x) * tr
    if duration < 1.0 / band[0]:
        reason = f"scan of {duration:.0f} s cannot resolve {band[0]} Hz"
        return {n: np.nan for n in ICA_NAMES}, {n: reason for n in ICA_NAMES}
    m = maps[:, valid]
    tc = np.linalg.lstsq(m.T, x[:, valid].T, rcond=None)[0].T  # dual regression stage 1: [T, 7]
    values = falff(tc, tr, band)
    reasons = {}
    out = {}
    for name, net, v, row in zip(ICA_NAMES, YEO7, values, m):
        if not np.any(row) or not (valid & (networks == net)).any():
            out[name], reasons[name] = np.nan, f"no usable ROI in network {net}"
        else:
            out[name] = float(v)
    return out, reasons
