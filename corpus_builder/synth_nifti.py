"""A small synthetic cohort in the fMRIPrep layout: 4D BOLD images whose atlas parcels carry synthetic series.

The ROI series come from the synthetic-BOLD generator `corpus_builder.synth_bold`, as the tables cohort's of
`corpus_builder.synth` do (group FC of the real Schaefer-400 / Tian ROIs named below, planted phenotype effects,
HRF-filtered noise, global signal, motion leakage, site amplitude), for a small atlas of 2 subcortical + 12
cortical parcels; every voxel of a parcel then carries its parcel's series plus a voxel baseline and white voxel
noise, white-matter voxels carry the white-matter signal of the confounds table. Parcel means therefore recover
the ROI series up to noise of 1/sqrt(voxels).

    ROOT/dataset_description.json, participants.tsv, synth.json
    ROOT/atlas/atlas-TianS3synth_dseg.nii.gz + .tsv       2 parcels, Tian S3 names (subcortical, first)
    ROOT/atlas/atlas-Schaefer400synth_dseg.nii.gz + .tsv  12 parcels, Schaefer-400 7-network names
    ROOT/sub-<id>/ses-<s>/func/sub-<id>_ses-<s>_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz
        + .json sidecar (RepetitionTime), + sub-<id>_ses-<s>_task-rest_desc-confounds_timeseries.tsv

Runs have their dataset profile's native TR and length (scaled by `length_scale`) on a 20x24x20 grid of
8 mm voxels, stored as scaled int16 as many scanners write them. Build with the fmriprep source and
`atlas_config(ROOT)` as the atlas (`synth.json` names the same files).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from corpus_builder.atlas import default_labels, roi_table
from corpus_builder.config import AtlasConfig, SynthConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.synth_bold import PLANTED_EFFECTS, bold_scans, group_fc

GRID = (20, 24, 20)
VOXEL_MM = 8.0
SPACE = "MNI152NLin6Asym"
SUBCORTICAL = ("HIP-head-m-rh", "HIP-head-m-lh")             # image value 1, 2 (right, left: Tian's order)
CORTICAL = tuple(f"7Networks_LH_{n}_1" for n in ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont",
                                                   "Default")) + \
    tuple(f"7Networks_RH_{n}_1" for n in ("Vis", "SomMot", "DorsAttn", "Cont", "Default"))
ATLAS_FILES = (("TianS3synth", SUBCORTICAL), ("Schaefer400synth", CORTICAL))


def _affine() -> np.ndarray:
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -(np.array(GRID) - 1) * VOXEL_MM / 2
    return affine


def atlas_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subcortical labels, cortical labels, white-matter mask) on GRID.

    An ellipsoid brain: a core split by hemisphere (x > 0 is right, RAS), a white-matter ring, and a cortical
    shell cut into angular sectors, 7 in the left hemisphere and 5 in the right.
    """
    axes = [np.linspace(-1, 1, n) for n in GRID]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.9) ** 2 + (y / 0.95) ** 2 + (z / 0.9) ** 2)
    sub = np.zeros(GRID, np.int16)
    core = r < 0.4
    sub[core & (x > 0)] = 1
    sub[core & (x <= 0)] = 2
    shell = (r >= 0.62) & (r < 1.0)
    angle = (np.arctan2(z, y) + np.pi) / (2 * np.pi)        # 0..1 around the x axis
    cortex = np.zeros(GRID, np.int16)
    n_left = sum(lbl.startswith("7Networks_LH") for lbl in CORTICAL)
    n_right = len(CORTICAL) - n_left
    left = np.minimum((angle * n_left).astype(int), n_left - 1) + 1
    right = np.minimum((angle * n_right).astype(int), n_right - 1) + 1 + n_left
    cortex[shell & (x <= 0)] = left[shell & (x <= 0)]
    cortex[shell & (x > 0)] = right[shell & (x > 0)]
    white = (r >= 0.4) & (r < 0.62)
    return sub, cortex, white


def write_atlas(root: Path) -> AtlasConfig:
    """Write the two label images and their tables under ROOT/atlas/; returns the matching AtlasConfig."""
    folder = Path(root) / "atlas"
    folder.mkdir(parents=True, exist_ok=True)
    sub, cortex, _ = atlas_images()
    images, tables = [], []
    for (name, labels), data in zip(ATLAS_FILES, (sub, cortex)):
        image, table = folder / f"atlas-{name}_dseg.nii.gz", folder / f"atlas-{name}_dseg.tsv"
        nib.save(nib.Nifti1Image(data, _affine()), image)
        names = pd.DataFrame({"index": range(1, len(labels) + 1), "name": labels})
        names.to_csv(table, sep="\t", index=False)
        images.append(image)
        tables.append(table)
    return AtlasConfig(images=images, labels=tables, n_rois=len(SUBCORTICAL) + len(CORTICAL))


def atlas_config(root: Path) -> AtlasConfig:
    """The atlas of a cohort written by `write_nifti_cohort` (files under ROOT/atlas/)."""
    folder = Path(root) / "atlas"
    return AtlasConfig(images=[folder / f"atlas-{n}_dseg.nii.gz" for n, _ in ATLAS_FILES],
                       labels=[folder / f"atlas-{n}_dseg.tsv" for n, _ in ATLAS_FILES],
                       n_rois=len(SUBCORTICAL) + len(CORTICAL))


def _bold_image(rng: np.random.Generator, roi: np.ndarray, parcels: list[np.ndarray], white: np.ndarray,
                wm: np.ndarray, tr: float) -> nib.Nifti1Image:
    """Voxels = parcel series + a voxel baseline + white noise; white matter = the WM signal; outside 0."""
    n_vol = roi.shape[0]
    data = np.zeros((*GRID, n_vol), np.float32)
    for p, mask in enumerate(parcels):
        n = int(mask.sum())
        data[mask] = roi[:, p] + rng.normal(0, 20, (n, 1)) + rng.normal(0, 10, (n, n_vol))
    data[white] = wm + rng.normal(0, 20, (int(white.sum()), 1)) + rng.normal(0, 10, (int(white.sum()), n_vol))
    img = nib.Nifti1Image(data, _affine())
    img.set_data_dtype(np.int16)               # nibabel picks scl_slope / scl_inter on save
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((VOXEL_MM, VOXEL_MM, VOXEL_MM, tr))
    return img


def write_nifti_cohort(cfg: SynthConfig, root: Path, progress=None) -> pd.DataFrame:
    """Write a synthetic fMRIPrep-style cohort under `root`; returns the participants table.

    `progress(n)` is called after each scan when given. `cfg.roi_format` does not apply (images, not tables).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    atlas = write_atlas(root)
    labels = list(SUBCORTICAL + CORTICAL)
    everything = default_labels()
    pick = [everything.index(lbl) for lbl in labels]
    base = group_fc()[np.ix_(pick, pick)]
    networks = roi_table(labels)["network"].to_numpy()
    sub, cortex, white = atlas_images()
    parcels = [sub == v for v in range(1, len(SUBCORTICAL) + 1)] + \
        [cortex == v for v in range(1, len(CORTICAL) + 1)]

    rows = []
    for scan in bold_scans(cfg, rng, base, networks, leak_first=False):
        if scan.session == 1:
            rows.append(scan.participant)
        func, stem = scan.func_folder(root)
        img = _bold_image(rng, scan.roi, parcels, white, scan.confounds["white_matter"].to_numpy(), scan.tr)
        nib.save(img, func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz")
        (func / f"{stem}_space-{SPACE}_desc-preproc_bold.json").write_text(
            json.dumps({"RepetitionTime": scan.tr, "SkullStripped": False, "TaskName": "rest"}))
        scan.confounds.to_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False,
                              na_rep="n/a", float_format="%.6f")
        if progress is not None:
            progress(1)

    Pseudonymizer.for_synthetic(root)  # example data carries its own pseudonym key
    participants = pd.DataFrame(rows)
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "fmrilm synthetic cohort", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fmrilm synth --format nifti"}]}, indent=2))
    (root / "synth.json").write_text(json.dumps({
        "generator": "fmrilm synth --format nifti", "config": cfg.model_dump(mode="json"),
        "layout": "fmriprep", "grid": list(GRID), "voxel_mm": VOXEL_MM, "space": SPACE,
        "atlas": {"images": [str(Path(p).relative_to(root)) for p in atlas.images],
                  "labels": [str(Path(p).relative_to(root)) for p in atlas.labels], "n_rois": atlas.n_rois,
                  "note": "paths relative to this folder; set corpus.source.atlas to them"},
        "rois": labels,
        "planted_effects": PLANTED_EFFECTS,
    }, indent=2))
    return participants
