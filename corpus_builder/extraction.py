"""Sources -> clean ROI series of every scan, in one folder (the input of the corpus build).

    OUT/scans.parquet      one row per scan: key, dataset, pseudonymous subject, session, run, site,
                           status (ok / failed), error (reason, no path), index into the zarr, QC, phenotypes
    OUT/rois.tsv           atlas order: index, label, network
    OUT/timeseries.zarr    ts [S_ok, T, N] float32 (one chunk per scan), keys [S_ok]
    OUT/summary.json       counts (ok / failed by reason), seconds, scans/s

A failed scan is a row with its reason; it never stops the run.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from corpus_builder import sources
from corpus_builder.atlas import roi_table
from corpus_builder.config import SourceConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.records import PHENOTYPES, ScanRecord
from fmrilm_core.errors import InputError


def pseudonymizer_for(roots: list[Path]) -> Pseudonymizer:
    """The lab's secret from the environment; else the generated key of an example cohort (synthetic or
    imported example data carry `.pseudonym_key`); real sources without a secret are refused."""
    env = Pseudonymizer.from_env()
    if env is not None:
        return env
    keyed = [r for r in roots if (r / ".pseudonym_key").is_file()]
    if len(keyed) == len(roots) and roots:
        return Pseudonymizer((keyed[0] / ".pseudonym_key").read_bytes().strip())
    bare = next(r for r in roots if r not in keyed)
    raise InputError(f"{bare}: real source needs a pseudonym secret: set FMRILM_PSEUDONYM_KEY or "
                     "FMRILM_PSEUDONYM_KEY_FILE")


def failure_reason(error: str) -> str:
    """Group failures for counting: numbers and quoted names stripped."""
    return re.sub(r"'[^']*'|\d+(\.\d+)?", "#", error)[:80]


def discover_all(specs: list[str], cfg: SourceConfig) -> list[ScanRecord]:
    kinds = [sources.resolve(spec) for spec in specs]  # bad roots fail before anything is read
    pseudonymize = pseudonymizer_for([root for _, root in kinds])
    records: list[ScanRecord] = []
    for kind, root in kinds:
        records += sources.discover(f"{kind}:{root}", cfg, pseudonymize)
    seen: set[str] = set()
    for rec in records:
        if rec.key in seen and not rec.error:
            rec.fail(f"duplicate scan key {rec.key}")
        seen.add(rec.key)
    return records


def _row(rec: ScanRecord, index: int) -> dict:
    row = {"key": rec.key, "dataset": rec.dataset, "subject": rec.subject, "session": rec.session,
           "run": rec.run, "site": rec.site, "status": "failed" if rec.error else "ok", "error": rec.error,
           "index": index, "source": rec.loader}
    row.update({p: rec.phenotypes.get(p) for p in PHENOTYPES})
    row.update({f"qc_{k}": v for k, v in rec.qc.items()})
    return row


def extract_all(records: list[ScanRecord], cfg: SourceConfig, out: Path, progress=None) -> dict:
    """Extract every discovered scan into `out` (layout in the module docstring); returns the summary."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = sources.with_roi_count(records, cfg)
    n_ok_max = sum(1 for r in records if not r.error)
    group = zarr.open_group(out / "timeseries.zarr", mode="w")
    ts = group.create_array("ts", shape=(max(n_ok_max, 1), cfg.cleaning.length, cfg.atlas.n_rois),
                            chunks=(1, cfg.cleaning.length, cfg.atlas.n_rois), dtype="float32")
    keys: list[str] = []
    labels: list[str] | None = None
    lookup = cfg.atlas.lookup  # else a networks table the source found beside the data (e.g. AAL2)
    rows = []
    for rec in records:
        x, rec_labels = sources.extract(rec, cfg)
        index = -1
        if x is not None:
            if labels is None:
                labels = rec_labels
                lookup = lookup or rec.extra.get("networks")
            if rec_labels != labels:
                rec.fail("ROI labels differ from the corpus atlas (first scan's labels)")
            else:
                index = len(keys)
                ts[index] = x
                keys.append(rec.key)
        rows.append(_row(rec, index))
        if progress is not None:
            progress(1)
    if labels is None:
        first = next((r for r in records if r.error), None)
        raise InputError(f"no scan could be extracted (first failure: {first.error_message if first else '?'})")
    ts.resize((len(keys), cfg.cleaning.length, cfg.atlas.n_rois))
    group.create_array("keys", shape=(len(keys),), dtype=str)[:] = np.array(keys)
    pd.DataFrame(rows).to_parquet(out / "scans.parquet", index=False)
    roi_table(labels, lookup).to_csv(out / "rois.tsv", sep="\t", index=False)
    seconds = time.perf_counter() - start
    failed = [r for r in records if r.error]
    summary = {"scans": len(records), "ok": len(keys), "failed": len(failed),
               "failed_by_reason": dict(Counter(failure_reason(r.error) for r in failed)),
               "seconds": round(seconds, 2), "scans_per_s": round(len(records) / max(seconds, 1e-9), 2),
               "T": cfg.cleaning.length, "N": cfg.atlas.n_rois, "tr": cfg.cleaning.tr}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary | {"failures": [r.error_message for r in failed]}
