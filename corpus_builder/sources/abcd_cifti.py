"""ABCD (ABCC / DCAN derivatives) resting-state CIFTI-2 dense time series, parcellated with a label file.

Layout:

    ROOT/participants.tsv          optional; participant_id (sub-NDARINV...), optional session_id, sex, age,
                                   site, ... (the timeseries-tables format). With a session_id column the row
                                   of the scan's session is used.
    ROOT/sub-<id>/**/sub-<id>[_ses-<s>]_task-rest*bold*.dtseries.nii
                                   e.g. sub-NDARINVxx/ses-baselineYear1Arm1/func/
                                        sub-NDARINVxx_ses-baselineYear1Arm1_task-rest_run-1_bold_timeseries.dtseries.nii

Subject, session and run come from the BIDS entities of the file name (session and run default to "1").
Detection (`matches`) looks for ABCD ids (`sub-NDAR...`) only, so fMRIPrep CIFTI outputs are not taken for
ABCD; `abcd_cifti:ROOT` reads any `sub-*` folders.
When participants.tsv exists, a scan whose subject (and session) has no row there fails.

Parcellation: `cfg.atlas.cifti_labels` names the label file, either
- a CIFTI-2 `.dlabel.nii` on the same grayordinates: its (first) label map gives each grayordinate a key and
  its label table names the keys; key 0 and the name '???' are unlabelled; or
- a text / TSV file with one line per grayordinate whose first tab-separated field is the label name (an
  optional first line `label` or `name` is a header); empty, '???' and 'n/a' are unlabelled.
The ROI series is the mean over the label's grayordinates (one sparse matrix product per scan); columns
follow the label table order (for a TSV: the order of first appearance), and `roi_timeseries` then puts
subcortical labels with Tian-style names (ending -lh / -rh) first; with `atlas.lookup` (label -> network) the
labels it calls Subcortical come first whatever their names. A label with no grayordinates gives a
constant zero column. The label file's grayordinate count must equal the image's; a dlabel's brain models must
also be the same vertices and voxels.

TR: the step of the dtseries' series axis, which must be in seconds.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.cifti2 import BrainModelAxis, Cifti2Image, LabelAxis, SeriesAxis
from nibabel.filebasedimages import ImageFileError
from scipy import sparse

from corpus_builder.atlas import atlas_order, read_networks
from corpus_builder.config import SourceConfig
from corpus_builder.records import RawScan, ScanError, ScanRecord
from corpus_builder.sources.tables import apply_participant, entities, read_participants
from fmrilm_core.errors import InputError

DATASET = "ABCD"
PATTERN = "*_task-rest*bold*.dtseries.nii"
UNLABELLED = ("", "???", "n/a")


def _series_files(root: Path, subjects: str = "sub-*"):
    return (p for p in root.glob(f"{subjects}/**/{PATTERN}") if p.is_file())


def matches(root: Path) -> bool:
    """Only ABCD ids (sub-NDAR...): fMRIPrep's CIFTI outputs are dtseries files too."""
    return next(_series_files(root, "sub-NDAR*"), None) is not None


def participant_row(participants: pd.DataFrame, subject: str, session: str | None) -> pd.Series | None:
    """The participants row of `subject` (index without `sub-`), or None.

    Tables with one row per subject and session (a `session_id` column, as ABCC's) give the row of
    `session` (with or without the `ses-` prefix); None when the subject has rows but none for that session.
    """
    if subject not in participants.index:
        return None
    rows = participants.loc[[subject]]
    if "session_id" in rows.columns and rows["session_id"].notna().any() and session is not None:
        ses = rows["session_id"].fillna("").astype(str).str.removeprefix("ses-")
        rows = rows[ses == str(session).removeprefix("ses-")]
        if rows.empty:
            return None
    return rows.iloc[0]


def order_by_lookup(data: np.ndarray, labels: list[str], cfg: SourceConfig) -> tuple[np.ndarray, list[str]]:
    """Columns in atlas order by the networks table `cfg.atlas.lookup` when one is configured (atlases whose
    names say nothing, e.g. `Thalamus_L`); unchanged otherwise (`clean_scan` then orders by the names)."""
    if cfg.atlas.lookup is None:
        return data, labels
    order = atlas_order(labels, read_networks(Path(cfg.atlas.lookup)))
    return data[:, order], [labels[i] for i in order]


# --- label files --------------------------------------------------------------------------------------

class Parcellation:
    """Label names (column order) and the [L, G] averaging matrix of a grayordinate label file."""

    def __init__(self, names: list[str], codes: np.ndarray, brain_models: BrainModelAxis | None):
        """`codes[g]` is the column of grayordinate g, or -1 when it is unlabelled."""
        self.names = names
        self.n_grayordinates = int(codes.size)
        self.brain_models = brain_models
        labelled = np.flatnonzero(codes >= 0)
        counts = np.bincount(codes[labelled], minlength=len(names)).astype(np.float64)
        weights = 1.0 / counts[codes[labelled]]
        self.matrix = sparse.csr_matrix((weights, (codes[labelled], labelled)),
                                        shape=(len(names), self.n_grayordinates))

    def apply(self, data: np.ndarray) -> np.ndarray:
        """[T, G] grayordinate series -> [T, L] label means."""
        return np.asarray(self.matrix @ data.T).T


def _from_dlabel(path: Path, img: Cifti2Image) -> Parcellation:
    axes = [img.header.get_axis(i) for i in range(img.ndim)]
    label_dim = next((i for i, a in enumerate(axes) if isinstance(a, LabelAxis)), None)
    bm_dim = next((i for i, a in enumerate(axes) if isinstance(a, BrainModelAxis)), None)
    if label_dim is None or bm_dim is None or img.ndim != 2:
        raise InputError(f"{path}: not a dense label file (needs a label axis and a brain-model axis)")
    keys = np.asarray(img.dataobj)
    keys = keys[0] if label_dim == 0 else keys[:, 0]      # the first label map
    if not np.all(np.isfinite(keys)):
        raise InputError(f"{path}: non-finite label keys")
    keys = np.rint(keys).astype(np.int64)
    table = axes[label_dim].label[0]                       # key -> (name, rgba), in label table order
    columns: dict[int, int] = {}
    names: list[str] = []
    for key, (name, _rgba) in table.items():
        name = str(name).strip()
        if int(key) == 0 or name in UNLABELLED:
            continue
        if name in names:
            raise InputError(f"{path}: label name {name!r} appears twice in the label table")
        columns[int(key)] = len(names)
        names.append(name)
    present, inverse = np.unique(keys, return_inverse=True)
    unknown = sorted(set(present.tolist()) - {int(k) for k in table} - {0})
    if unknown:
        raise InputError(f"{path}: keys {unknown[:5]} are not in the label table")
    codes = np.array([columns.get(int(k), -1) for k in present], dtype=np.int64)[inverse.ravel()]
    return Parcellation(names, codes, axes[bm_dim])


def _from_text(path: Path) -> Parcellation:
    lines = [line.split("\t")[0].strip() for line in path.read_text().splitlines()]
    if lines and lines[0].lower() in ("label", "name"):
        lines = lines[1:]
    names: list[str] = []
    index: dict[str, int] = {}
    codes = np.full(len(lines), -1, dtype=np.int64)
    for g, name in enumerate(lines):
        if name in UNLABELLED:
            continue
        if name not in index:
            index[name] = len(names)
            names.append(name)
        codes[g] = index[name]
    return Parcellation(names, codes, None)


@lru_cache(maxsize=4)
def _parcellation(path: str, mtime_ns: int, size: int) -> Parcellation:
    p = Path(path)
    if p.name.endswith(".nii"):
        try:
            img = nib.load(p)
        except Exception as exc:   # nibabel raises many types for a broken file
            raise InputError(f"{p}: unreadable label file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(img, Cifti2Image):
            raise InputError(f"{p}: not a CIFTI-2 file")
        parc = _from_dlabel(p, img)
    else:
        parc = _from_text(p)
    if not parc.names:
        raise InputError(f"{p}: label file labels no grayordinates")
    return parc


def parcellation(path: Path | None) -> Parcellation:
    """The (cached) parcellation of the label file `cfg.atlas.cifti_labels`; InputError when unusable."""
    if path is None:
        raise InputError("ABCD CIFTI source needs atlas.cifti_labels (a .dlabel.nii or a label TSV)")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: CIFTI label file (atlas.cifti_labels) not found")
    stat = path.stat()
    return _parcellation(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# --- discovery and loading ----------------------------------------------------------------------------

def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    parcellation(cfg.atlas.cifti_labels)          # a bad label file stops the build here, once
    participants_path = root / "participants.tsv"
    participants = read_participants(participants_path) if participants_path.is_file() else None
    records = []
    for path in sorted(_series_files(root)):
        ent = entities(path)
        subject = ent.get("sub", "")
        session, run = ent.get("ses", "1"), ent.get("run", "1")
        record = ScanRecord(dataset=DATASET, subject=pseudonymize(DATASET, subject), session=session, run=run,
                            source_path=str(path), loader="abcd_cifti")
        if not subject:
            records.append(record.fail("no sub-<id> entity in the file name"))
            continue
        if participants is not None:
            row = participant_row(participants, subject, session)
            if row is None:
                records.append(record.fail(f"subject has no row for ses-{session} in participants.tsv"))
                continue
            apply_participant(record, row)
        records.append(record)
    return records


def _axes(img: Cifti2Image) -> tuple[int, SeriesAxis, BrainModelAxis]:
    axes = [img.header.get_axis(i) for i in range(img.ndim)]
    if img.ndim != 2:
        raise ScanError(f"dtseries has {img.ndim} dimensions, expected 2")
    series_dim = next((i for i, a in enumerate(axes) if isinstance(a, SeriesAxis)), None)
    if series_dim is None or not isinstance(axes[1 - series_dim], BrainModelAxis):
        kinds = ", ".join(type(a).__name__ for a in axes)
        raise ScanError(f"not a dense time series (axes: {kinds})")
    return series_dim, axes[series_dim], axes[1 - series_dim]


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    parc = parcellation(cfg.atlas.cifti_labels)
    try:
        img = nib.load(record.source_path)
    except ImageFileError as exc:
        raise ScanError(f"unreadable image ({type(exc).__name__}: nibabel cannot read it)") from exc
    if not isinstance(img, Cifti2Image):
        raise ScanError("not a CIFTI-2 file")
    series_dim, series, models = _axes(img)
    if series.unit != "SECOND":
        raise ScanError(f"series axis unit is {series.unit}, expected SECOND")
    tr = float(series.step)
    if not np.isfinite(tr) or tr <= 0:
        raise ScanError(f"invalid series step (TR) {tr}")
    if len(models) != parc.n_grayordinates:
        raise ScanError(f"label file has {parc.n_grayordinates} grayordinates, the image {len(models)}")
    if parc.brain_models is not None and parc.brain_models != models:
        raise ScanError("label file and image have the same grayordinate count but other vertices or voxels")
    data = np.asarray(img.dataobj, dtype=np.float32)
    if series_dim == 1:
        data = data.T
    x, labels = order_by_lookup(parc.apply(data).astype(np.float64), list(parc.names), cfg)
    return RawScan(data=x, labels=labels, tr=tr)
