"""The HDF5 files of the fMRI-LM reference implementation, so its users can switch without re-extracting.

Layout (one file per dataset; `<DS>` becomes the record's dataset name, e.g. UKB, ABCD, HCP):

    ROOT/data/<DS>/fmri/TianS3/data_resampled.h5
        time_series/sample_<i>    float array (450, T): ROI-major, already at TR 2.0 s (transposed to [T, 450])
        metadata/subjects         one subject id per sample (bytes or str), aligned with the sample index i
        metadata/sessions         one session per sample, aligned the same way
    ROOT/data/<DS>/participants.tsv   optional, the timeseries-tables format (participant_id, sex, age, ...)

One record per entry of `metadata/subjects`; `record.extra` holds the HDF5 path (`h5`) and the sample name
(`sample`). Samples of the same subject and session get runs 1, 2, ... in sample order, so keys stay unique.
A `sub-` / `ses-` prefix on the stored ids is dropped. When participants.tsv exists, a sample whose subject
has no row there fails; without it the records carry no phenotypes.

ROI labels: the reference files store none. Their rows are Tian Scale III (50) then Schaefer-400 (7 networks),
the atlas order of this project, so the labels are `corpus_builder.atlas.default_labels()`; a sample with
another row count fails.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from corpus_builder.atlas import default_labels
from corpus_builder.config import SourceConfig
from corpus_builder.records import RawScan, ScanError, ScanRecord
from corpus_builder.sources.abcd_cifti import participant_row
from corpus_builder.sources.tables import apply_participant, read_participants
from fmrilm_core.errors import InputError

log = logging.getLogger(__name__)

REFERENCE_TR = 2.0          # seconds; the reference files are already resampled to TR 2.0 s
H5_PATTERN = "data/*/fmri/TianS3/data_resampled.h5"


def matches(root: Path) -> bool:
    return any(p.is_file() for p in root.glob(H5_PATTERN))


@lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    return tuple(default_labels())


def _strings(values) -> list[str]:
    out = []
    for v in np.asarray(values).ravel():
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        out.append(str(v).strip())
    return out


def _read_metadata(h5: Path) -> tuple[list[str], list[str], set[str]]:
    """(subjects, sessions, sample names present). Raises InputError: a broken file is not one bad scan."""
    try:
        with h5py.File(h5, "r") as f:
            subjects = _strings(f["metadata/subjects"][()])
            sessions = _strings(f["metadata/sessions"][()]) if "metadata/sessions" in f else []
            samples = set(f["time_series"].keys()) if "time_series" in f else set()
    except (OSError, KeyError) as exc:
        raise InputError(f"{h5}: not a readable fMRI-LM reference file ({type(exc).__name__}: {exc})") from exc
    return subjects, sessions, samples


def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    records: list[ScanRecord] = []
    for h5 in sorted(p for p in root.glob(H5_PATTERN) if p.is_file()):
        ds_dir = h5.parents[2]
        dataset = ds_dir.name
        participants_path = ds_dir / "participants.tsv"
        participants = read_participants(participants_path) if participants_path.is_file() else None
        subjects, sessions, samples = _read_metadata(h5)
        extra_samples = len(samples - {f"sample_{i}" for i in range(len(subjects))})
        if extra_samples:
            log.warning("%s: %d time_series samples have no metadata entry and are skipped", h5, extra_samples)
        runs: Counter = Counter()
        for i, raw_subject in enumerate(subjects):
            name = f"sample_{i}"
            subject = raw_subject.removeprefix("sub-")
            session = (sessions[i] if i < len(sessions) else "").removeprefix("ses-") or "1"
            runs[subject, session] += 1
            record = ScanRecord(dataset=dataset, subject=pseudonymize(dataset, subject), session=session,
                                run=str(runs[subject, session]), source_path=str(h5), loader="reference_h5",
                                tr=REFERENCE_TR, extra={"h5": str(h5), "sample": name})
            if not subject:
                records.append(record.fail(f"{name}: empty subject id in metadata/subjects"))
                continue
            if i >= len(sessions) and sessions:
                records.append(record.fail(f"{name}: no metadata/sessions entry"))
                continue
            if name not in samples:
                records.append(record.fail(f"{name}: no time_series/{name} in the file"))
                continue
            if participants is not None:
                row = participant_row(participants, subject, session)
                if row is None:
                    records.append(record.fail(f"{name}: subject has no row in participants.tsv"))
                    continue
                apply_participant(record, row)
            records.append(record)
    return records


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    name = record.extra["sample"]
    with h5py.File(record.extra["h5"], "r") as f:
        node = f.get(f"time_series/{name}")
        if not isinstance(node, h5py.Dataset):
            raise ScanError(f"{name}: no time_series/{name} in the file")
        data = np.asarray(node[()], dtype=np.float64)
    labels = list(_labels())
    if data.ndim != 2 or data.shape[0] != len(labels):
        raise ScanError(f"{name} has shape {data.shape}, expected ({len(labels)}, T): "
                        "Tian S3 + Schaefer-400 rows, volumes as columns")
    return RawScan(data=data.T, labels=labels, tr=record.tr or REFERENCE_TR)
