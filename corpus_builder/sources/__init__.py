"""Sources: each module discovers the scans of one on-disk layout and loads them.

A source module has
    discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]
    load(record: ScanRecord, cfg: SourceConfig) -> RawScan
Discovery never reads the big files and never raises for a single bad scan: it returns the record with
`error` set. `--source kind:PATH` names the layout; a bare PATH is detected (`detect`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from corpus_builder.config import SourceConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.records import RawScan, ScanError, ScanRecord
from corpus_builder.roi_timeseries import clean_scan
from corpus_builder.sources import abcd_cifti, abcd_nifti, fmriprep, reference_h5, tables, ukb_csv, ukb_nifti
from fmrilm_core.errors import InputError

SOURCES = {"reference_h5": reference_h5, "ukb_csv": ukb_csv, "abcd_cifti": abcd_cifti,
           "fmriprep": fmriprep, "abcd_nifti": abcd_nifti, "ukb_nifti": ukb_nifti, "tables": tables}


def register(name: str, module) -> None:
    SOURCES[name] = module


def parse_source(spec: str) -> tuple[str | None, Path]:
    """`kind:PATH` or `PATH` (kind detected later)."""
    kind, sep, path = spec.partition(":")
    if sep and kind in SOURCES:
        return kind, Path(path)
    return None, Path(spec)


def detect(root: Path) -> str:
    """Guess the layout of a source root from its files."""
    if not root.exists():
        raise InputError(f"{root}: source does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: source is not a directory")
    for name, module in SOURCES.items():
        if module.matches(root):
            return name
    raise InputError(f"{root}: no known source layout found (kinds: {', '.join(SOURCES)})")


def resolve(spec: str) -> tuple[str, Path]:
    """(kind, root) of a source spec; raises InputError for a missing root or an unknown layout."""
    kind, root = parse_source(spec)
    if not root.is_dir():
        raise InputError(f"{root}: source does not exist" if not root.exists() else f"{root}: not a directory")
    return kind or detect(root), root


def discover(spec: str, cfg: SourceConfig, pseudonymize: Pseudonymizer) -> list[ScanRecord]:
    kind, root = resolve(spec)
    records = SOURCES[kind].discover(root, cfg, pseudonymize)
    if not records:
        raise InputError(f"{root}: no scans found for source kind {kind!r}")
    return records


def load_scan(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    return SOURCES[record.loader].load(record, cfg)


def with_roi_count(records: list[ScanRecord], cfg: SourceConfig, tries: int = 5) -> SourceConfig:
    """`cfg` with `atlas.n_rois` set: as configured, or (None) the ROI count of the first discovered scan that
    loads, so a cohort of any atlas builds without restating its size; every other scan must then match it.
    One-line InputError when none of the first `tries` scans loads."""
    if cfg.atlas.n_rois is not None:
        return cfg
    reasons = []
    for record in [r for r in records if not r.error][:tries]:
        try:
            raw = load_scan(record, cfg)
        except (ScanError, OSError, ValueError, EOFError) as exc:
            reasons.append(_without_paths(str(exc)) or type(exc).__name__)
            continue
        n_rois = int(np.asarray(raw.data).shape[-1])
        return cfg.model_copy(update={"atlas": cfg.atlas.model_copy(update={"n_rois": n_rois})})
    first = f" (first: {reasons[0]})" if reasons else ""
    raise InputError(f"atlas.n_rois is not set and none of the first {len(reasons)} discovered scans loads to read "
                     f"the ROI count from{first}; set corpus.source.atlas.n_rois")


def _without_paths(message: str) -> str:
    """First line of a library error with file paths cut out: paths can hold raw subject ids."""
    first = message.splitlines()[0] if message else ""
    return re.sub(r"(?:[A-Za-z]+://)?/[^\s'\"]+", "<path>", first)


def extract(record: ScanRecord, cfg: SourceConfig) -> tuple[np.ndarray | None, list[str] | None]:
    """Load and clean one scan. On failure sets `record.error` (one line, naming the file) and returns
    (None, None); the caller records it and goes on."""
    if record.error:
        return None, None
    try:
        raw = load_scan(record, cfg)
        x, labels, qc = clean_scan(raw, cfg.cleaning, cfg.atlas.n_rois)
    except ScanError as exc:
        record.fail(str(exc))
        return None, None
    except (OSError, ValueError, EOFError) as exc:  # unreadable / corrupt files
        record.fail(f"unreadable: {type(exc).__name__}: {_without_paths(str(exc))}".rstrip(": "))
        return None, None
    record.qc.update(qc)
    return x, labels
