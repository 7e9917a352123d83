"""UK Biobank pre-parcellated ROI series: per subject one Tian S3 CSV and one Schaefer-400 CSV.

Layout (one folder per subject and imaging visit, directly under ROOT):

    ROOT/<eid>_20227_<instance>_<array>/   (the UKB bulk-field folder name; or just ROOT/<eid>/)
        *TianS3*.csv               Tian Scale III subcortical ROIs (50 rows)
        *Schaefer*400*.csv         Schaefer-400 cortical ROIs (400 rows)

The two glob patterns (`TIAN_PATTERN`, `SCHAEFER_PATTERN`) are fixed, not configured; exactly one file
must match each. Each CSV has a `label_name` column (the ROI name) and one column per volume, so rows are
ROIs and columns volumes; it is transposed to [T, N]. Columns named `Unnamed: <i>` (a pandas index written
with the table) are dropped. The scan's ROIs are the Tian rows then the Schaefer rows (450 with the full
atlases; `roi_timeseries` keeps Tian-named (…-lh / …-rh) ROIs first in any case, and with `atlas.lookup`
the ROIs that table calls Subcortical).

Records: dataset "UKB", session = the visit instance from the folder name ("2" for a bare `<eid>` folder),
run "1", TR = `UKB_TR` (0.735 s, the UKB resting-state protocol's repetition time). Phenotypes come from
the UKB field table `cfg.ukb.phenotypes` (read by `ukb_fields.read_ukb_fields` at the folder's instance; a
configured `site` field becomes `record.site`); when it is configured, an eid missing from it fails
(withdrawn participants are dropped from field tables). Without it the records carry no phenotypes.

Failures name the file by its role (the file names hold the raw eid): a folder with a missing half, or
several files matching a pattern, fails at discovery; mismatched volume counts, a wrong ROI count (50 / 400
each when `atlas.n_rois` is 450, else the sum must equal `atlas.n_rois` when it is set), a missing `label_name`
column or non-numeric values fail when the scan is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from corpus_builder.config import SourceConfig
from corpus_builder.records import RawScan, ScanError, ScanRecord
from corpus_builder.sources.abcd_cifti import order_by_lookup
from corpus_builder.sources.ukb_fields import read_ukb_fields

DATASET = "UKB"
UKB_TR = 0.735                 # seconds: UKB rfMRI protocol (multiband 8, 490 volumes)
DEFAULT_INSTANCE = "2"         # the first imaging visit
TIAN_PATTERN = "*TianS3*.csv"
SCHAEFER_PATTERN = "*Schaefer*400*.csv"
TIAN_S3_ROIS = 50
SCHAEFER_ROIS = 400
ROLES = {"tian": ("Tian S3 CSV", TIAN_PATTERN), "schaefer": ("Schaefer-400 CSV", SCHAEFER_PATTERN)}
_FOLDER = re.compile(r"^(\d+)(?:_(\d+)_(\d+)_(\d+))?$")    # eid[_field_instance_array]
_MATCH_PROBES = 20             # subject folders `matches` looks into before giving up


def _subject_dirs(root: Path):
    with os.scandir(root) as entries:
        for entry in entries:
            m = _FOLDER.match(entry.name)
            if m and entry.is_dir():
                yield Path(entry.path), m


def matches(root: Path) -> bool:
    for n, (folder, _m) in enumerate(_subject_dirs(root)):
        if any(next(folder.glob(pattern), None) is not None for pattern in (TIAN_PATTERN, SCHAEFER_PATTERN)):
            return True
        if n + 1 >= _MATCH_PROBES:
            break
    return False


def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    fields: dict[str, dict] = {}           # instance -> eid -> phenotypes (per-visit fields such as age)
    records = []
    for folder, m in sorted(_subject_dirs(root), key=lambda item: item[0].name):
        eid, instance = m.group(1), m.group(3) or DEFAULT_INSTANCE
        record = ScanRecord(dataset=DATASET, subject=pseudonymize(DATASET, eid), session=instance, run="1",
                            source_path=str(folder), loader="ukb_csv", tr=UKB_TR)
        problems = []
        for key, (role, pattern) in ROLES.items():
            found = sorted(p for p in folder.glob(pattern) if p.is_file())
            if len(found) == 1:
                record.extra[key] = str(found[0])
            elif not found:
                problems.append(f"missing the {role} ({pattern})")
            else:
                problems.append(f"{len(found)} files match {pattern} (the {role})")
        if problems:
            records.append(record.fail("; ".join(problems)))
            continue
        if cfg.ukb.phenotypes is not None:
            if instance not in fields:
                fields[instance] = read_ukb_fields(cfg.ukb.phenotypes, cfg.ukb, instance=instance)
            phenotypes = fields[instance].get(eid)
            if phenotypes is None:
                records.append(record.fail("eid not in the UKB field table (ukb.phenotypes)"))
                continue
            phenotypes = dict(phenotypes)
            site = phenotypes.pop("site", None)
            record.site = str(site) if site is not None else None
            record.phenotypes = phenotypes
        records.append(record)
    return records


def _read(path: Path, role: str) -> tuple[list[str], np.ndarray]:
    """(ROI labels, [R, T] values) of one CSV; ScanError naming the role."""
    try:
        frame = pd.read_csv(path)
    except OSError as exc:
        raise ScanError(f"{role} unreadable ({type(exc).__name__})") from exc
    except ValueError as exc:            # EmptyDataError, ParserError
        raise ScanError(f"{role} unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from exc
    if "label_name" not in frame.columns:
        raise ScanError(f"{role} has no label_name column")
    volumes = [c for c in frame.columns if c != "label_name" and not str(c).startswith("Unnamed:")]
    try:
        values = frame[volumes].to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ScanError(f"{role} has non-numeric values") from exc
    return frame["label_name"].astype(str).str.strip().tolist(), values


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    parts = {key: _read(Path(record.extra[key]), role) for key, (role, _pattern) in ROLES.items()}
    (tian_labels, tian), (schaefer_labels, schaefer) = parts["tian"], parts["schaefer"]
    if tian.shape[1] != schaefer.shape[1]:
        raise ScanError(f"Tian S3 CSV has {tian.shape[1]} volumes, the Schaefer-400 CSV {schaefer.shape[1]}")
    n_rois = cfg.atlas.n_rois
    if n_rois == TIAN_S3_ROIS + SCHAEFER_ROIS:
        for role, rows, expected in (("Tian S3 CSV", len(tian), TIAN_S3_ROIS),
                                     ("Schaefer-400 CSV", len(schaefer), SCHAEFER_ROIS)):
            if rows != expected:
                raise ScanError(f"{role} has {rows} ROI rows, expected {expected}")
    elif n_rois is not None and len(tian) + len(schaefer) != n_rois:
        raise ScanError(f"Tian S3 CSV has {len(tian)} ROI rows and the Schaefer-400 CSV {len(schaefer)}: "
                        f"{len(tian) + len(schaefer)} ROIs, expected {n_rois} (atlas.n_rois)")
    data, labels = order_by_lookup(np.vstack([tian, schaefer]).T, tian_labels + schaefer_labels, cfg)
    return RawScan(data=data, labels=labels, tr=record.tr or UKB_TR)
