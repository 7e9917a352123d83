"""Timeseries tables (BIDS-derivatives style), the simplest real input and the synthetic cohorts' layout.

    ROOT/participants.tsv                     participant_id, sex, age, fluid_intelligence, diagnosis, site, dataset
    ROOT/sub-<id>/[ses-<s>/]func/sub-<id>[_ses-<s>]_task-rest[_run-<r>]_atlas-<atlas>_timeseries.<ext>
        ext: tsv, tsv.gz, csv, csv.gz (header = ROI labels) or npy (T x N; labels from
        ROOT/atlas-<atlas>_dseg.tsv with `index` and `name` columns)
    .json sidecar with RepetitionTime (seconds); optional ..._desc-confounds_timeseries.tsv beside it.
    ROOT/atlas-<atlas>_networks.tsv (optional; `label`, `network`): the ROI networks of an atlas whose names
        say nothing (AAL2). Discovery puts its path in `record.extra["networks"]`; `load` returns the columns
        in atlas order by it (subcortical first), or by `atlas.lookup` when the config names one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from corpus_builder.atlas import atlas_order, read_networks
from corpus_builder.config import SourceConfig
from corpus_builder.records import RawScan, ScanError, ScanRecord
from fmrilm_core.errors import InputError

EXTENSIONS = (".tsv.gz", ".csv.gz", ".tsv", ".csv", ".npy")
_ENTITY = re.compile(r"(sub|ses|task|run|atlas)-([A-Za-z0-9]+)")


def _is_series(path: Path) -> bool:
    name = path.name
    return "_desc-confounds_" not in name and any(name.endswith("_timeseries" + ext) for ext in EXTENSIONS)


def matches(root: Path) -> bool:
    return (root / "participants.tsv").is_file() and any(_is_series(p) for p in root.glob("sub-*/**/func/*"))


def _stem(path: Path) -> str:
    for ext in EXTENSIONS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def entities(path: Path) -> dict[str, str]:
    return dict(_ENTITY.findall(_stem(path)))


def read_participants(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: participants table not found")
    table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a", "NA", ""], keep_default_na=False)
    if "participant_id" not in table:
        raise InputError(f"{path}: no participant_id column")
    table["participant_id"] = table["participant_id"].str.removeprefix("sub-")
    return table.set_index("participant_id")


def phenotypes_of(row: pd.Series) -> dict:
    """Canonical phenotypes from a participants row; missing values are left out, never invented."""
    out: dict = {}
    sex = row.get("sex")
    if isinstance(sex, str) and sex.strip():
        s = sex.strip().upper()
        out["sex"] = {"MALE": "M", "FEMALE": "F", "1": "M", "2": "F"}.get(s, s[:1])
    for key in ("age", "fluid_intelligence"):
        value = pd.to_numeric(row.get(key), errors="coerce")
        if pd.notna(value):
            out[key] = float(value)
    diagnosis = row.get("diagnosis")
    if isinstance(diagnosis, str) and diagnosis.strip():
        out["diagnosis"] = diagnosis.strip()
    return out


def apply_participant(record: ScanRecord, row: pd.Series) -> None:
    """Site and canonical phenotypes of a participants row onto a record (shared by every source)."""
    record.site = row.get("site") if isinstance(row.get("site"), str) else None
    record.phenotypes = phenotypes_of(row)


def discover(root: Path, cfg: SourceConfig, pseudonymize) -> list[ScanRecord]:
    participants = read_participants(root / "participants.tsv")
    records = []
    for path in sorted(p for p in root.glob("sub-*/**/func/*") if _is_series(p)):
        ent = entities(path)
        subject = ent.get("sub", "")
        row = participants.loc[subject] if subject in participants.index else None
        dataset = str(row["dataset"]) if row is not None and isinstance(row.get("dataset"), str) else root.name
        record = ScanRecord(dataset=dataset, subject=pseudonymize(dataset, subject), session=ent.get("ses", "1"),
                            run=ent.get("run", "1"), source_path=str(path), loader="tables",
                            extra={"atlas": ent.get("atlas")})
        networks = root / f"atlas-{ent.get('atlas')}_networks.tsv"
        if "atlas" in ent and networks.is_file():
            record.extra["networks"] = str(networks)
        if row is None:
            records.append(record.fail("subject has no row in participants.tsv"))
            continue
        apply_participant(record, row)
        sidecar = path.with_name(_stem(path) + ".json")
        try:
            record.tr = float(json.loads(sidecar.read_text())["RepetitionTime"])
        except (OSError, KeyError, ValueError, TypeError):
            records.append(record.fail("missing RepetitionTime in its .json sidecar"))
            continue
        confounds = sorted(path.parent.glob(f"sub-{subject}*_desc-confounds_timeseries.tsv"))
        run_tag = f"_run-{ent['run']}" if "run" in ent else ""
        confounds = [c for c in confounds if not run_tag or run_tag in c.name]
        if confounds:
            record.extra["confounds"] = str(confounds[0])
        records.append(record)
    return records


def _labels_for_npy(path: Path, atlas: str | None) -> list[str]:
    root = next((p for p in path.parents if (p / "participants.tsv").is_file()), path.parent)
    dseg = root / f"atlas-{atlas}_dseg.tsv"
    if not dseg.is_file():
        raise ScanError(f"npy series needs ROI labels in {dseg.name} at the source root")
    return pd.read_csv(dseg, sep="\t")["name"].astype(str).tolist()


def load(record: ScanRecord, cfg: SourceConfig) -> RawScan:
    path = Path(record.source_path)
    if path.name.endswith(".npy"):
        data = np.load(path, allow_pickle=False)
        labels = _labels_for_npy(path, record.extra.get("atlas"))
    else:
        sep = "," if ".csv" in path.name else "\t"
        frame = pd.read_csv(path, sep=sep)
        data, labels = frame.to_numpy(dtype=np.float64), [str(c) for c in frame.columns]
    if data.ndim != 2 or data.shape[1] != len(labels):
        raise ScanError(f"{data.shape[-1] if data.ndim else 0} columns but {len(labels)} ROI labels")
    lookup = cfg.atlas.lookup or record.extra.get("networks")
    if lookup is not None:  # atlas order by the networks table; clean_scan's name-based order then keeps it
        order = atlas_order(labels, read_networks(Path(lookup)))
        data, labels = data[:, order], [labels[i] for i in order]
    confounds = None
    if "confounds" in record.extra:
        confounds = pd.read_csv(record.extra["confounds"], sep="\t", na_values=["n/a"])
    return RawScan(data=data, labels=labels, tr=record.tr, confounds=confounds)


def clean_file(path: Path, cfg: SourceConfig, n_rois: int | None = None) -> tuple[np.ndarray, list[str]]:
    """One scan file of the tables layout, cleaned exactly as a corpus build cleans it: X [T, N] in atlas order
    and its ROI labels (`n_rois`: the count expected). For `fmrilm ask --scan FILE`; no participant row is
    needed. A file that cannot be used is an InputError naming it."""
    from corpus_builder.roi_timeseries import clean_scan

    path = Path(path)
    if not path.is_file() or not _is_series(path):
        raise InputError(f"{path}: not a scan of the tables layout (*_timeseries.{{tsv,tsv.gz,csv,csv.gz,npy}})")
    ent = entities(path)
    record = ScanRecord(dataset="scan", subject="scan", session="1", run="1", source_path=str(path),
                        loader="tables", extra={"atlas": ent.get("atlas")})
    root = next((p for p in path.parents if (p / "participants.tsv").is_file()), path.parent)
    networks = root / f"atlas-{ent.get('atlas')}_networks.tsv"
    if "atlas" in ent and networks.is_file():
        record.extra["networks"] = str(networks)
    sidecar = path.with_name(_stem(path) + ".json")
    try:
        record.tr = float(json.loads(sidecar.read_text())["RepetitionTime"])
    except (OSError, KeyError, ValueError, TypeError):
        raise InputError(f"{path}: no RepetitionTime in its .json sidecar {sidecar.name}") from None
    confounds = path.with_name(re.sub(r"_atlas-[A-Za-z0-9]+_timeseries.*$", "_desc-confounds_timeseries.tsv",
                                      path.name))
    if confounds.is_file():
        record.extra["confounds"] = str(confounds)
    try:
        x, labels, _ = clean_scan(load(record, cfg), cfg.cleaning, n_rois)
    except (ScanError, OSError, ValueError) as err:
        raise InputError(f"{path}: {err}") from None
    return x, labels
