"""The synthetic-BOLD generator of both synthetic writers (`corpus_builder.synth`: ROI tables,
`corpus_builder.synth_nifti`: 4D images), so that their cohorts are made the same way.

Every scan is generated in four steps (all documented in `ROOT/synth.json` next to the data):

1. Subject FC = the real Schaefer-400 group connectivity that BrainSpace ships (plus a subcortical block)
   + planted phenotype effects on network blocks + individual and site variability, projected back to a
   valid correlation matrix.
2. Neural noise at the dataset's native TR, convolved with the canonical HRF (slow, autocorrelated
   BOLD-like signals), mixed through the Cholesky factor of the subject FC.
3. A global signal, motion-like confounds (random-walk realignment parameters with spikes, written as an
   fMRIPrep-style confounds table) leaking into the data, white measurement noise, site amplitude.
4. Raw BOLD-like units (baseline 1000 +- a few %): the ROI series a parcellation step would output.

`bold_scans(cfg, rng, base, networks, ...)` yields them one scan at a time (`SynthScan`: the subject's
participants.tsv row, the session, the ROI series, the confounds table); a writer may draw more from the same
generator between scans (the NIfTI writer's voxel noise), so a seed decides the whole cohort.

Planted effects (sign, per unit of `effects.*`, added to Fisher-z-like block means before projection):
- sex: males +0.08 within Default and SomMot, females +0.08 within Vis and Limbic;
- age (z within dataset): -0.06 x z on every within-network block (segregation falls with age);
- fluid intelligence (z): +0.07 x z on Cont-Default and within Cont;
- diagnosis: AD -0.12 within Default; ADHD +0.10 DorsAttn-Default; ASD -0.10 subcortical-cortical.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn.glm.first_level import spm_hrf

from corpus_builder.atlas import NETWORKS, SUBCORTICAL
from corpus_builder.config import SynthConfig

PLANTED_EFFECTS = __doc__.split("Planted effects")[1].strip()  # written into every cohort's synth.json


@dataclass(frozen=True)
class DatasetProfile:
    tr: float              # seconds
    volumes: int           # native scan length
    age: tuple[float, float]
    diagnosis: str | None  # the patient group of this dataset, None = no diagnosis column
    sites: int
    id_style: str


PROFILES = {
    "UKB": DatasetProfile(0.735, 490, (45, 80), None, 3, "ukb"),
    "ABCD": DatasetProfile(0.8, 383, (9, 11), "ADHD", 3, "abcd"),
    "HCP": DatasetProfile(0.72, 1200, (22, 36), None, 1, "hcp"),
    "ADNI": DatasetProfile(3.0, 197, (55, 90), "AD", 2, "adni"),
    "ADHD200": DatasetProfile(2.0, 176, (7, 21), "ADHD", 3, "plain"),
    "ABIDE": DatasetProfile(2.0, 196, (7, 40), "ASD", 3, "plain"),
}


def group_fc() -> np.ndarray:
    """450 x 450 group correlation: Tian S3 block (synthetic) + BrainSpace's real Schaefer-400 mean FC."""
    path = resources.files("brainspace") / "datasets/matrices/main_group/schaefer_400_mean_connectivity_matrix.csv"
    cortex = np.loadtxt(str(path), delimiter=",")
    n_sub = 50
    fc = np.full((n_sub + 400, n_sub + 400), 0.08)
    fc[:n_sub, :n_sub] = 0.35
    fc[n_sub:, n_sub:] = cortex
    np.fill_diagonal(fc, 1.0)
    return fc


def _block_masks(networks: np.ndarray) -> dict[str, np.ndarray]:
    return {net: networks == net for net in NETWORKS}


def _pair(masks, a: str, b: str) -> np.ndarray:
    m = np.outer(masks[a], masks[b])
    return (m | m.T).astype(float)


def planted_effect(networks: np.ndarray, sex: str, age_z: float, fi_z: float, diagnosis: str | None,
                   effects) -> np.ndarray:
    """The symmetric FC offset a subject's phenotypes plant (see module docstring)."""
    masks = _block_masks(networks)
    d = np.zeros((len(networks), len(networks)))
    sign = 1.0 if sex == "M" else -1.0
    d += effects.sex * 0.08 * sign * (_pair(masks, "Default", "Default") + _pair(masks, "SomMot", "SomMot"))
    d -= effects.sex * 0.08 * sign * (_pair(masks, "Vis", "Vis") + _pair(masks, "Limbic", "Limbic"))
    for net in NETWORKS:
        d -= effects.age * 0.06 * age_z * _pair(masks, net, net)
    d += effects.fluid_intelligence * 0.07 * fi_z * (_pair(masks, "Cont", "Default") + _pair(masks, "Cont", "Cont"))
    if diagnosis == "AD":
        d -= effects.diagnosis * 0.12 * _pair(masks, "Default", "Default")
    elif diagnosis == "ADHD":
        d += effects.diagnosis * 0.10 * _pair(masks, "DorsAttn", "Default")
    elif diagnosis == "ASD":
        cortex = ~masks[SUBCORTICAL]
        m = np.outer(masks[SUBCORTICAL], cortex)
        d -= effects.diagnosis * 0.10 * (m | m.T)
    return d


def nearest_correlation(c: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Clip eigenvalues and rescale to unit diagonal: a valid correlation matrix close to `c`."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    c = (v * np.maximum(w, floor)) @ v.T
    s = np.sqrt(np.diag(c))
    return c / np.outer(s, s)


def _bold_noise(rng: np.random.Generator, n_vol: int, n: int, tr: float) -> np.ndarray:
    """n slow BOLD-like unit-variance series: white neural noise convolved with the canonical HRF."""
    hrf = spm_hrf(tr, oversampling=1)
    pad = len(hrf)
    z = rng.standard_normal((n_vol + pad, n))
    out = np.apply_along_axis(lambda col: np.convolve(col, hrf)[pad:pad + n_vol], 0, z)
    return (out - out.mean(0)) / out.std(0)


def _motion(rng: np.random.Generator, n_vol: int) -> pd.DataFrame:
    trans = np.cumsum(rng.normal(0, 0.02, (n_vol, 3)), 0)           # mm
    rot = np.cumsum(rng.normal(0, 0.0004, (n_vol, 3)), 0)           # radians
    spikes = rng.random(n_vol) < 0.02
    trans[spikes] += rng.normal(0, 0.4, (spikes.sum(), 3))
    params = np.hstack([trans, rot])
    diff = np.vstack([np.zeros((1, 6)), np.diff(params, axis=0)])
    fd = np.abs(diff[:, :3]).sum(1) + 50 * np.abs(diff[:, 3:]).sum(1)  # Power et al., 50 mm head radius
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    df = pd.DataFrame(params, columns=cols)
    df["framewise_displacement"] = fd
    df.loc[0, "framewise_displacement"] = np.nan  # as fMRIPrep writes it
    return df


def _subject_id(rng: np.random.Generator, style: str) -> str:
    if style == "ukb":
        return str(rng.integers(1_000_000, 6_000_000))
    if style == "abcd":
        return "NDARINV" + "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ0123456789"), 8))
    if style == "hcp":
        return str(rng.integers(100_000, 999_999))
    if style == "adni":
        return f"{rng.integers(2, 999):03d}S{rng.integers(1000, 9999)}"
    return str(rng.integers(10_000, 99_999))


def draw_subject(rng: np.random.Generator, dataset: str, used_ids: set[str], site_fc: dict,
                 shape: tuple[int, int]) -> tuple[dict, tuple[str, float, float, str | None]]:
    """One subject of `dataset`: its participants.tsv row and (sex, age z, fluid-intelligence z, diagnosis).

    `used_ids` keeps ids unique; `site_fc` gets a small scanner-specific FC offset and amplitude per new site.
    """
    prof = PROFILES[dataset]
    while (sid := _subject_id(rng, prof.id_style)) in used_ids:
        pass
    used_ids.add(sid)
    site = f"{dataset}-site{rng.integers(prof.sites) + 1}"
    if site not in site_fc:
        noise = rng.normal(0, 0.02, shape)
        site_fc[site] = ((noise + noise.T) / 2, rng.uniform(0.7, 1.3))
    sex = "M" if rng.random() < 0.5 else "F"
    age = float(rng.uniform(*prof.age))
    age_z = (age - np.mean(prof.age)) / (np.ptp(prof.age) / np.sqrt(12))
    fi_z = float(rng.standard_normal())
    diagnosis = None
    if prof.diagnosis is not None:
        diagnosis = prof.diagnosis if rng.random() < 0.5 else "CN"
    row = {"participant_id": f"sub-{sid}", "sex": sex, "age": round(age, 1),
           "fluid_intelligence": int(np.clip(round(6 + 2 * fi_z), 0, 13)) if dataset == "UKB" else
           round(100 + 15 * fi_z, 1),
           "diagnosis": diagnosis if diagnosis is not None else "n/a", "site": site, "dataset": dataset}
    return row, (sex, age_z, fi_z, diagnosis)


@dataclass
class SynthScan:
    """One generated scan: `participant` is its subject's participants.tsv row (the same dict for every session),
    `session` counts from 1, `roi` [T, N] the raw BOLD-like ROI series, `confounds` the fMRIPrep-style table
    (realignment parameters, framewise displacement, global signal, white matter, CSF)."""

    participant: dict
    session: int
    tr: float
    roi: np.ndarray
    confounds: pd.DataFrame

    def func_folder(self, root: Path) -> tuple[Path, str]:
        """(the scan's BIDS-style `sub-<id>/ses-<n>/func` folder under `root`, created; its file stem
        `sub-<id>_ses-<n>_task-rest`): where both writers put its files."""
        sid = self.participant["participant_id"].removeprefix("sub-")
        func = Path(root) / f"sub-{sid}" / f"ses-{self.session}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        return func, f"sub-{sid}_ses-{self.session}_task-rest"


def bold_scans(cfg: SynthConfig, rng: np.random.Generator, base: np.ndarray, networks: np.ndarray, *,
               leak_first: bool) -> Iterator[SynthScan]:
    """The scans of a cohort of `cfg.subjects` subjects x `cfg.sessions` sessions, subject by subject, drawn from
    `rng`; `base` is the group FC of the cohort's ROIs, `networks` their networks.

    `leak_first`: whether the motion-leakage weights are drawn before the global-signal weights (the tables
    writer's order) or after them (the NIfTI writer's). Either order makes the same kind of data; each writer keeps
    its own so that a seed still gives the cohort it always gave.
    """
    n = len(networks)
    used_ids: set[str] = set()
    site_fc: dict = {}
    for i in range(cfg.subjects):
        dataset = cfg.datasets[i % len(cfg.datasets)]
        prof = PROFILES[dataset]
        row, (sex, age_z, fi_z, diagnosis) = draw_subject(rng, dataset, used_ids, site_fc, base.shape)
        effect = planted_effect(networks, sex, age_z, fi_z, diagnosis, cfg.effects)
        individual = rng.normal(0, 0.015, base.shape)
        site_offset, amplitude = site_fc[row["site"]]
        for ses in range(cfg.sessions):
            fc = nearest_correlation(base + effect + site_offset + (individual + individual.T) / 2)
            n_vol = max(16, int(round(prof.volumes * cfg.length_scale)))
            signal = _bold_noise(rng, n_vol, n, prof.tr) @ np.linalg.cholesky(fc).T
            confounds = _motion(rng, n_vol)
            gs = _bold_noise(rng, n_vol, 1, prof.tr)[:, 0]
            motion = confounds.iloc[:, :6].to_numpy()
            motion_z = (motion - motion.mean(0)) / (motion.std(0, ddof=1) + 1e-9)
            if leak_first:
                leak = rng.normal(0, 0.3, (6, n))
                gs_weight = rng.uniform(0.3, 0.8, n)
            else:
                gs_weight = rng.uniform(0.3, 0.8, n)
                leak = rng.normal(0, 0.3, (6, n))
            roi = signal + np.outer(gs, gs_weight) + motion_z @ leak + rng.normal(0, 0.5, signal.shape)
            roi = 1000 + 10 * amplitude * roi * rng.uniform(0.5, 1.5, n)
            confounds["global_signal"] = 1000 + 10 * gs
            # tissue signals: physiological noise shared with the global signal, as fMRIPrep reports them
            confounds["white_matter"] = 900 + 5 * (0.5 * gs + rng.standard_normal(n_vol))
            confounds["csf"] = 1500 + 8 * (0.3 * gs + rng.standard_normal(n_vol))
            yield SynthScan(row, ses + 1, prof.tr, roi, confounds)
