"""A synthetic resting-state cohort in the timeseries-tables layout, with planted phenotype effects.

The scans come from the synthetic-BOLD generator `corpus_builder.synth_bold` (the steps and the planted effects
are documented there and in `ROOT/synth.json` next to the data), on all 450 ROIs of Tian S3 + Schaefer-400 or an
even subset of them (`n_rois`); the tables hold what a parcellation step would output:

    ROOT/participants.tsv, synth.json, atlas-TianS3Schaefer400_dseg.tsv
    ROOT/sub-<id>/ses-<s>/func/sub-<id>_ses-<s>_task-rest_atlas-TianS3Schaefer400_timeseries.{npy,tsv,tsv.gz}
        + .json sidecar (RepetitionTime, Atlas), + sub-<id>_ses-<s>_task-rest_desc-confounds_timeseries.tsv
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from corpus_builder.atlas import default_labels, roi_table
from corpus_builder.config import SynthConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.synth_bold import (  # noqa: F401  (the generator's names, importable from here as before)
    PLANTED_EFFECTS,
    PROFILES,
    DatasetProfile,
    bold_scans,
    draw_subject,
    group_fc,
    nearest_correlation,
    planted_effect,
)

ATLAS_NAME = "TianS3Schaefer400"


def _write_table(path_stem: Path, data: np.ndarray, labels: list[str], fmt: str) -> Path:
    if fmt == "npy":
        path = path_stem.with_name(path_stem.name + ".npy")
        np.save(path, data.astype(np.float32))
    else:
        path = path_stem.with_name(path_stem.name + "." + fmt)
        pd.DataFrame(data, columns=labels).to_csv(path, sep="\t", index=False, float_format="%.4f")
    return path


def synthesize(cfg: SynthConfig, root: Path, progress=None) -> pd.DataFrame:
    """Write a synthetic cohort under `root` (tables layout); returns the participants table.

    `progress(n)` is called after each scan when given.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    labels = default_labels()
    base = group_fc()
    if cfg.n_rois is not None and cfg.n_rois < len(labels):  # a principal submatrix of a correlation matrix is one
        keep = np.unique(np.linspace(0, len(labels) - 1, cfg.n_rois).round().astype(int))
        labels, base = [labels[i] for i in keep], base[np.ix_(keep, keep)]
    table = roi_table(labels)
    networks = table["network"].to_numpy()

    roi_path = root / f"atlas-{ATLAS_NAME}_dseg.tsv"
    table.rename(columns={"label": "name"}).to_csv(roi_path, sep="\t", index=False)

    rows = []
    for scan in bold_scans(cfg, rng, base, networks, leak_first=True):
        if scan.session == 1:
            rows.append(scan.participant)
        func, stem = scan.func_folder(root)
        _write_table(func / f"{stem}_atlas-{ATLAS_NAME}_timeseries", scan.roi, labels, cfg.roi_format)
        (func / f"{stem}_atlas-{ATLAS_NAME}_timeseries.json").write_text(
            json.dumps({"RepetitionTime": scan.tr, "Atlas": ATLAS_NAME}))
        scan.confounds.to_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a",
                              float_format="%.6f")
        if progress is not None:
            progress(1)

    Pseudonymizer.for_synthetic(root)  # example data carries its own pseudonym key
    participants = pd.DataFrame(rows)
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "synth.json").write_text(json.dumps({
        "generator": "fmrilm synth", "config": cfg.model_dump(mode="json"), "atlas": ATLAS_NAME,
        "planted_effects": PLANTED_EFFECTS,
    }, indent=2))
    return participants
