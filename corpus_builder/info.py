"""`fmrilm corpus info`: what a corpus holds, from its manifest, version records and the build's QC records.

    info = corpus_info("runs/demo/corpus")    # {"version", "versions", "scans", "by", "failures", "qc"}
    print(format_info(info))                   # the terminal table

Counts per dataset, split, status and version; failure reasons grouped (numbers and names stripped, as the build
counts them); QC summaries of the usable scans (original TR, original length in volumes, mean framewise
displacement where the source had motion confounds). Reads only small files: the manifest and the extract markers,
never a tar or a zarr chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from corpus_builder.extraction import failure_reason
from corpus_builder.metadata import read_manifest
from corpus_builder.versions import finished_record, shard_file_names

QC_FIELDS = {"original_tr": "TR (s)", "original_length": "length (volumes)", "mean_fd": "mean FD (mm)"}


def corpus_info(out: str | Path) -> dict:
    out = Path(out)
    complete = finished_record(out)
    manifest = read_manifest(out)
    versions = []
    for v in range(1, int(complete.get("version", 0)) + 1):
        path = out / "versions" / f"v{v:04d}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            versions.append({"version": v, "created": r.get("created"), "sources": r.get("sources"),
                             "added": r.get("added"), "shards": len(r.get("shards", []))})
    by = {}
    for column in ("dataset", "split", "status", "version"):
        by[column] = {str(k): int(v) for k, v in manifest[column].value_counts().sort_index().items()}
    table = manifest.groupby(["dataset", "split", "status"]).size()
    by["dataset_split_status"] = [{"dataset": d, "split": s, "status": st, "scans": int(n)}
                                  for (d, s, st), n in table.items()]
    failed = manifest[manifest["status"] == "failed"]
    failures = failed["error"].map(failure_reason).value_counts()
    return {"corpus": str(out), "version": complete.get("version"), "versions": versions,
            "scans": len(manifest), "ok": int((manifest["status"] == "ok").sum()), "failed": len(failed),
            "subjects": int(manifest[["dataset", "subject"]].drop_duplicates().shape[0]),
            "shards": len(complete.get("shards", [])), "by": by,
            "failures": [{"reason": r, "scans": int(n)} for r, n in failures.items()],
            "qc": _qc(out, manifest, complete.get("shards", []))}


def _qc(out: Path, manifest: pd.DataFrame, shards: list[str]) -> dict:
    """Per QC field, over the usable scans: n, mean, min, median, max (from the build's extract markers)."""
    ok = set(manifest.loc[manifest["status"] == "ok", "key"])
    values: dict[str, list[float]] = {f: [] for f in QC_FIELDS}
    for name in shards:
        marker = out / "shards" / shard_file_names(name)["extract"]
        if not marker.is_file():
            continue
        for key, scan in json.loads(marker.read_text())["scans"].items():
            if key in ok:
                for field in QC_FIELDS:
                    value = (scan.get("qc") or {}).get(field)
                    if value is not None and np.isfinite(value):
                        values[field].append(float(value))
    return {field: ({"n": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)), "median": float(np.median(v)),
                     "max": float(np.max(v))} if v else {"n": 0}) for field, v in values.items()}


def format_info(info: dict) -> str:
    """The terminal form of `corpus_info`."""
    version = info["version"] if info["version"] is not None else "- (built before corpora recorded versions)"
    lines = [f"{info['corpus']}: version {version}, {info['scans']} scans ({info['ok']} ok, "
             f"{info['failed']} failed) of {info['subjects']} subjects in {info['shards']} shards"]
    for v in info["versions"]:
        added = v.get("added") or {}
        lines.append(f"  v{v['version']}  {v['created'] or '?':25s}  +{added.get('scans', '?')} scans "
                     f"({added.get('subjects', '?')} new subjects, {added.get('sessions_of_known_subjects', 0)} "
                     f"sessions of known ones) in {v['shards']} shards from {','.join(v['sources'] or [])}")
    lines.append("")
    lines.append(f"  {'dataset':10s} {'split':6s} {'status':7s} {'scans':>6s}")
    for row in info["by"]["dataset_split_status"]:
        lines.append(f"  {row['dataset']:10s} {row['split']:6s} {row['status']:7s} {row['scans']:6d}")
    if info["failures"]:
        lines.append("")
        lines += [f"  failed: {f['scans']} x {f['reason']}" for f in info["failures"]]
    lines.append("")
    for field, label in QC_FIELDS.items():
        q = info["qc"][field]
        lines.append(f"  {label:18s} " + (f"mean {q['mean']:.3g}, median {q['median']:.3g}, range "
                                          f"[{q['min']:.3g}, {q['max']:.3g}] over {q['n']} scans" if q["n"]
                                          else "not recorded"))
    return "\n".join(lines)
