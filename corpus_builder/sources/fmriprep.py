"""fMRIPrep / BIDS derivatives: preprocessed resting-state BOLD runs, parcellated with the configured atlas.

    ROOT/participants.tsv         (or in the BIDS dataset above ROOT when ROOT is .../derivatives/<pipeline>)
    ROOT/sub-<id>/[ses-<s>/]func/
        sub-<id>[_ses-<s>]_task-rest[_acq-<a>][_run-<r>][_space-<sp>]_desc-preproc_bold.nii.gz
        + its .json sidecar (RepetitionTime; without one the NIfTI header's TR is used)
        + sub-<id>[_ses-<s>]_task-rest[_acq-<a>][_run-<r>]_desc-confounds_timeseries.tsv (older fMRIPrep:
          _desc-confounds_regressors.tsv), the same run's nuisance regressors

Tasks whose name starts with `rest` are taken. A run written in several output spaces is used once: in the
space whose grid is the atlas's (headers are read to decide), else the first of MNI152NLin6Asym,
MNI152NLin2009cAsym, other MNI spaces, anything else. Parcellation is `corpus_builder.nifti`; confound
regression happens later, in `roi_timeseries.clean_scan`, from the confounds table `load` returns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from corpus_builder.config import SourceConfig
from corpus_builder.nifti import LabelAtlas, check_atlas, load_image, read_scan
from corpus_builder.records import RawScan, ScanError, ScanRecord
from corpus_builder.sources.tables import apply_participant, read_participants
from fmrilm_core.errors import InputError

BOLD_SUFFIXES = ("_desc-preproc_bold.nii.gz", "_desc-preproc_bold.nii")
CONFOUND_SUFFIXES = ("_desc-confounds_timeseries.tsv", "_desc-confounds_regressors.tsv")
RUN_ENTITIES = ("sub", "ses", "task", "acq", "ce", "dir", "rec", "run", "echo")   # what identifies a run
SPACE_PREFERENCE = ("MNI152NLin6Asym", "MNI152NLin2009cAsym", "MNI")
_ENTITY = re.compile(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)")


def bids_entities(path: Path | str) -> dict[str, str]:
    """All `key-value` entities of a BIDS file name (the suffix and extension are ignored)."""
    return dict(_ENTITY.findall(Path(path).name.split(".")[0]))


def is_rest(ent: dict[str, str]) -> bool:
    return ent.get("task", "").lower().startswith("rest")


def run_label(ent: dict[str, str]) -> str:
    """The record's run: the run entity, prefixed by what else tells two rest runs of a session apart."""
    extra = ent.get("task", "rest")[4:] + ent.get("acq", "") + ent.get("dir", "") + ent.get("echo", "")
    return extra + ent.get("run", "1") if extra else ent.get("run", "1")


def sidecar_tr(bold: Path) -> float | None:
    """RepetitionTime from the BOLD's .json sidecar; None when there is no usable one."""
    sidecar = bold.with_name(bold.name.split(".")[0] + ".json")
    try:
        tr = float(json.loads(sidecar.read_text())["RepetitionTime"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return tr if tr > 0 else None


def find_participants(root: Path) -> Path | None:
    """ROOT/participants.tsv, else that of the BIDS dataset a derivatives folder sits in."""
    candidates = [root / "participants.tsv"]
    if "derivatives" in root.parts:
        idx = len(root.parts) - 1 - root.parts[::-1].index("derivatives")
        candidates.append(Path(*root.parts[:idx]) / "participants.tsv")
    return next((p for p in candidates if p.is_file()), None)


def find_confounds(bold: Path) -> Path | None:
    """The confounds table of the same run (same run entities, any space), in the BOLD's folder."""
    ent = bids_entities(bold)
    key = {k: ent.get(k) for k in RUN_ENTITIES}
    for path in sorted(bold.parent.iterdir()):
        if path.name.endswith(CONFOUND_SUFFIXES):
            other = bids_entities(path)
            if {k: other.get(k) for k in RUN_ENTITIES} == key:
                return path
    return None


def read_confounds(path: Path | str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (OSError, ValueError) as exc:
        raise ScanError(f"unreadable confounds table ({type(exc).__name__})") from None  # name holds the id


def bold_files(root: Path, suffixes: tuple[str, ...]):
    """Resting-state BOLD files under ROOT/sub-*/.../func/ whose names end with one of `suffixes`."""
    return (p for p in root.glob("sub-*/**/func/*")
            if p.name.endswith(suffixes) and is_rest(bids_entities(p)))


def matches(root: Path) -> bool:
    return any(True for _ in bold_files(root, BOLD_SUFFIXES))


def _on_grid(path: Path, atlas: LabelAtlas) -> bool:
    try:
        atlas.check_grid(load_image(path))      # reads the header only
    except ScanError:                          # unreadable or another grid: not chosen here
        return False
    return True


def _space_rank(path: Path) -> int:
    space = bids_entities(path).get("space", "")
    return next((i for i, s in enumerate(SPACE_PREFERENCE) if space.startswith(s)), len(SPACE_PREFERENCE))


def pick_space(candidates: list[Path], atlas: LabelAtlas) -> Path:
    """One file of a run written in several spaces: the one on the atlas grid, else by SPACE_PREFERENCE."""
    ranked = sorted(candidates, key=lambda p: (_space_rank(p), p.name))
    if len(ranked) > 1:
        return next((p for p in ranked if _on_grid(p, atlas)), ranked[0])
    return ranked[0]


def group_runs(paths) -> dict[tuple, list[Path]]:
    runs: dict[tuple, list[Path]] = {}
    for path in sorted(paths):
        ent = bids_entities(path)
        runs.setdefault(tuple(ent.get(k) for k in RUN_ENTITIES), []).append(path)
    return runs


def participant_row(participants: pd.DataFrame, subject: str, session: str | None) -> pd.Series | None:
    """The subject's row; with one row per session (a `session_id` column, as ABCC writes), that session's."""
    if subject not in participants.index:
        return None
    rows = participants.loc[[subject]]
    if len(rows) > 1 and "session_id" in rows and session is not None:
        same = rows[rows["session_id"].astype(str).str.removeprefix("ses-") == session]
        rows = same if len(same) else rows
    return rows.iloc[0]


def dataset_name(root: Path) -> str:
    """The BIDS dataset's name for a derivatives folder (bids/derivatives/fmriprep -> bids), else ROOT's."""
    if "derivatives" in root.parts:
        idx = len(root.parts) - 1 - root.parts[::-1].index("derivatives")
        if idx > 0:
            return root.parts[idx - 1]
    return root.name


def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    atlas = check_atlas(cfg.atlas)
    table = find_participants(root)
    if table is None:
        raise InputError(f"{root}: participants.tsv not found (at the root, or at the BIDS root above "
                         "derivatives/); a table with only participant_id is enough")
    participants = read_participants(table)
    records = []
    for candidates in group_runs(bold_files(root, BOLD_SUFFIXES)).values():
        bold = pick_space(candidates, atlas)
        ent = bids_entities(bold)
        subject = ent.get("sub", "")
        row = participant_row(participants, subject, ent.get("ses"))
        dataset = str(row["dataset"]) if row is not None and isinstance(row.get("dataset"), str) else \
            dataset_name(root)
        record = ScanRecord(dataset=dataset, subject=pseudonymize(dataset, subject),
                            session=ent.get("ses", "1"), run=run_label(ent), source_path=str(bold),
                            loader="fmriprep", tr=sidecar_tr(bold), extra={"space": ent.get("space")})
        if row is None:
            records.append(record.fail(f"subject has no row in {table.name}"))
            continue
        apply_participant(record, row)
        confounds = find_confounds(bold)
        if confounds is not None:
            record.extra["confounds"] = str(confounds)
        elif cfg.cleaning.confounds:
            record.fail("no desc-confounds_timeseries.tsv for this run (or set cleaning.confounds to [])")
        records.append(record)
    return records


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    raw = read_scan(record.source_path, cfg.atlas, record.tr)
    record.tr = raw.tr
    if "confounds" in record.extra:
        raw.confounds = read_confounds(record.extra["confounds"])
    return raw
