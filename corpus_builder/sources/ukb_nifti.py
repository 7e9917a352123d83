"""UK Biobank resting-state NIfTI folders (bulk field 20227), parcellated with the configured atlas.

    ROOT/<eid>_20227_<instance>_<array>/fMRI/rfMRI.ica/filtered_func_data_clean_MNI152.nii.gz
    ROOT/<eid>/fMRI/rfMRI.ica/...                     (instance 2 assumed)
        filtered_func_data_clean.nii.gz (native space) is taken when the MNI152 file is absent; the atlas
        must then be on that grid.

The data are already cleaned by UKB (ICA-FIX), so there is no confounds table. TR comes from the header
(0.735 s). Session = the UKB instance (2 = first imaging visit, 3 = repeat), run = array index + 1.
Phenotypes come from the field table `cfg.ukb.phenotypes` (`ukb_fields.read_ukb_fields`); without one
the scans carry none, and a scan whose eid the table lacks fails.
"""

from __future__ import annotations

import re
from pathlib import Path

from corpus_builder.config import SourceConfig
from corpus_builder.nifti import check_atlas, read_scan
from corpus_builder.records import RawScan, ScanRecord
from corpus_builder.sources.ukb_fields import read_ukb_fields

DATASET = "UKB"
FOLDER = re.compile(r"^(\d+)(?:_20227_(\d+)_(\d+))?$")
FILES = ("filtered_func_data_clean_MNI152.nii.gz", "filtered_func_data_clean.nii.gz")


def _scan_file(folder: Path) -> Path | None:
    ica = folder / "fMRI" / "rfMRI.ica"
    return next((ica / name for name in FILES if (ica / name).is_file()), None)


def _scans(root: Path):
    """(eid, instance, array, file) of every subject folder that holds a scan."""
    for folder in sorted(root.iterdir()):
        m = FOLDER.match(folder.name)
        if m and folder.is_dir() and (path := _scan_file(folder)) is not None:
            yield m[1], m[2] or "2", m[3] or "0", path


def matches(root: Path) -> bool:
    return any(True for _ in _scans(root))


def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    check_atlas(cfg.atlas)
    fields: dict[str, dict[str, dict]] = {}    # instance -> eid -> phenotypes
    records = []
    for eid, instance, array, path in _scans(root):
        record = ScanRecord(dataset=DATASET, subject=pseudonymize(DATASET, eid), session=instance,
                            run=str(int(array) + 1), source_path=str(path), loader="ukb_nifti",
                            extra={"space": "MNI152" if "MNI152" in path.name else "native"})
        if cfg.ukb.phenotypes is not None:
            if instance not in fields:
                fields[instance] = read_ukb_fields(cfg.ukb.phenotypes, cfg.ukb, instance)
            if eid not in fields[instance]:
                table = cfg.ukb.phenotypes.name
                records.append(record.fail(f"subject has no row in the UKB field table {table}"))
                continue
            phenotypes = dict(fields[instance][eid])
            record.site = phenotypes.pop("site", None)
            record.phenotypes = phenotypes
        records.append(record)
    return records


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    raw = read_scan(record.source_path, cfg.atlas, record.tr)   # TR from the header
    record.tr = raw.tr
    return raw
