"""What a source yields: scan records, and the raw ROI series a record loads into.

A `ScanRecord` is small and picklable (it travels to Ray tasks); `load_scan` (in `corpus_builder.sources`)
turns it into a `RawScan`, and `roi_timeseries.clean_scan` turns that into the `[T, N]` series at TR 2.0 s.
Subject ids in records are already keyed pseudonyms (`corpus_builder.privacy`); only file paths can still
hold raw ids, and those never leave the machine that builds the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PHENOTYPES = ("sex", "age", "fluid_intelligence", "diagnosis")


@dataclass
class ScanRecord:
    dataset: str
    subject: str                 # keyed pseudonym, never the raw id
    session: str
    run: str
    source_path: str             # the file (or folder) the scan is read from; names it in errors
    loader: str                  # name of the source module that can load it (see sources.LOADERS)
    tr: float | None = None      # seconds, when known at discovery (sidecar, header)
    site: str | None = None
    phenotypes: dict = field(default_factory=dict)   # subset of PHENOTYPES; missing ones are absent
    extra: dict = field(default_factory=dict)        # loader-specific: confounds path, HDF5 index, ...
    error: str | None = None     # one-line reason the scan cannot be used (without the path: paths hold raw ids)
    qc: dict = field(default_factory=dict)           # filled by cleaning

    @property
    def key(self) -> str:
        """`{dataset}-{pseudo_subject}-{session}-{run}`, with no dots (webdataset splits keys at dots)."""
        parts = (self.dataset, self.subject, self.session or "1", self.run or "1")
        return "-".join(str(p).replace(".", "_").replace("-", "_") for p in parts)

    def fail(self, reason: str) -> ScanRecord:
        """Mark the record failed with a one-line reason; returns the record."""
        self.error = " ".join(str(reason).split())
        return self

    @property
    def error_message(self) -> str:
        """The reason with the file it concerns, for the user's terminal (not for shards or MLflow)."""
        return f"{self.source_path}: {self.error}"


@dataclass
class RawScan:
    """ROI series as stored by the source: native TR and length, the source's own ROI order."""

    data: np.ndarray                          # [T, N] float
    labels: list[str]                         # N ROI labels, one per column
    tr: float                                 # seconds
    confounds: pd.DataFrame | None = None     # fMRIPrep-style columns, one row per volume


class ScanError(Exception):
    """A scan that cannot be used; the message is one line and names the file."""
