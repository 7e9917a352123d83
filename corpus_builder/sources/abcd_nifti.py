"""ABCD (ABCC / ABCD-BIDS derivatives) resting-state runs in MNI volume space, parcellated with the atlas.

    ROOT/[participants.tsv]
    ROOT/sub-NDAR<...>/ses-<baselineYear1Arm1|2YearFollowUpYArm1|...>/func/
        sub-<id>_ses-<s>_task-rest[_run-<r>]_space-MNI_bold.nii.gz   (+ .json sidecar with RepetitionTime;
        without one the header's TR, 0.8 s)
        optional sub-<id>_ses-<s>_task-rest[_run-<r>]_desc-confounds_timeseries.tsv, regressed out later

Phenotypes come from ROOT/participants.tsv when there is one (one row per subject, or per session with a
`session_id` column); without it the scans carry none. The CIFTI (.dtseries.nii) runs of the same
collection are the `abcd_cifti` source.
"""

from __future__ import annotations

from pathlib import Path

from corpus_builder.config import SourceConfig
from corpus_builder.nifti import check_atlas
from corpus_builder.records import RawScan, ScanRecord
from corpus_builder.sources import fmriprep
from corpus_builder.sources.fmriprep import (
    bids_entities,
    find_confounds,
    participant_row,
    run_label,
    sidecar_tr,
)
from corpus_builder.sources.tables import apply_participant, read_participants

DATASET = "ABCD"
BOLD_SUFFIXES = ("_space-MNI_bold.nii.gz", "_space-MNI_bold.nii")


def matches(root: Path) -> bool:
    return any(True for _ in fmriprep.bold_files(root, BOLD_SUFFIXES))


def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    check_atlas(cfg.atlas)
    table = root / "participants.tsv"
    participants = read_participants(table) if table.is_file() else None
    records = []
    for bold in sorted(fmriprep.bold_files(root, BOLD_SUFFIXES)):
        ent = bids_entities(bold)
        subject = ent.get("sub", "")
        record = ScanRecord(dataset=DATASET, subject=pseudonymize(DATASET, subject),
                            session=ent.get("ses", "1"), run=run_label(ent), source_path=str(bold),
                            loader="abcd_nifti", tr=sidecar_tr(bold))
        if participants is not None:
            row = participant_row(participants, subject, ent.get("ses"))
            if row is None:
                records.append(record.fail(f"subject has no row in {table.name}"))
                continue
            apply_participant(record, row)
        confounds = find_confounds(bold)
        if confounds is not None:
            record.extra["confounds"] = str(confounds)
        records.append(record)
    return records


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    return fmriprep.load(record, cfg)
