"""Corpus versions and the checksums that prove a corpus is still the one that was built (docs/corpus.md).

Each `corpus build` or `corpus add` that finishes writes a version record, `versions/v0001.json`, ...:

    {"format": "fmrilm-corpus-version", "version": 2, "parent": 1, "created": "2026-...",
     "sources": [...], "source_files": "<fingerprint>", "shards": ["train-000004", ...],      # what it added
     "manifest": "versions/v0002.manifest.parquet",                                           # the whole corpus
     "added": {"scans", "ok", "failed", "subjects", "sessions_of_known_subjects"}, "totals": {...},
     "fingerprints": {"splits_sha256", "norms_sha256", "manifest_sha256"},
     "checksums": {"files": {path: [bytes, sha256]}, "shards": {name: {path: [bytes, sha256]}}},
     "config": {...}}                                                   # the corpus config (version 1 only)

The shards a version added never change afterwards: their tar, manifest part, pass markers and zarr blocks (every
array is chunked by shard, so shard i owns block i of each) are checksummed when the shard is written
(`shard_checksums`), and version 1 also checksums the root files an add keeps frozen (norms, reference fit, ROI
table). `complete.json` names the current version, its manifest and every shard: it is the commit point of an add,
and readers list only the shards it names. `verify` checks every record against the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from fmrilm_core.errors import InputError

FORMAT = "fmrilm-corpus-version"
COMPLETE = "complete.json"  # written last by a finished build or add: the commit point
STARTED = "build.json"  # written first by a build (its inputs): with no COMPLETE beside it, a build was interrupted
FROZEN = ("norms.json", "reference.npz", "rois.tsv")  # fitted once; an add z-scores against them
ARRAYS = ("ts", "descriptors", "fc_pairs", "keys")


def digest(path: Path) -> list:
    """[bytes, sha256] of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return [os.path.getsize(path), sha.hexdigest()]


def finished_record(out: Path) -> dict:
    """complete.json of a finished corpus; one-line errors for a build that never finished or no corpus."""
    out = Path(out)
    if not (out / COMPLETE).is_file():
        if (out / STARTED).is_file():
            raise InputError(f"{out}: its build never finished (no {COMPLETE}); rerun `fmrilm corpus build` with the "
                             "same sources to finish it first")
        raise InputError(f"{out}: not a corpus (no {COMPLETE})")
    return json.loads((out / COMPLETE).read_text())


def _sha16(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def version_path(version: int) -> str:
    return f"versions/v{version:04d}.json"


def shard_file_names(name: str) -> dict[str, str]:
    """The files of one shard under shards/: its tar, manifest part and pass markers (`_stats.json` last)."""
    return {"tar": f"{name}.tar", "manifest": f"{name}_manifest.parquet", "extract": f".{name}.extract",
            "describe": f".{name}.describe", "write": f"{name}_stats.json"}


def block_files(out: Path, block: int, shard_size: int) -> list[str]:
    """The zarr files of row block `block` (the rows of one shard), relative to the corpus root; an array whose
    rows are not chunked by shard (`keys` of a corpus built before versions) is left out (verify checks it by
    content)."""
    files = []
    for name in ARRAYS:
        meta = out / "timeseries.zarr" / name / "zarr.json"
        if not meta.is_file():
            continue
        grid = json.loads(meta.read_text()).get("chunk_grid", {}).get("configuration", {})
        if (grid.get("chunk_shape") or [0])[0] != shard_size:
            continue
        root = out / "timeseries.zarr" / name / "c" / str(block)
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.is_file())
    return [str(p.relative_to(out)) for p in files]


def shard_checksums(out: Path, name: str, block: int, folder: str = "shards") -> dict[str, list]:
    """Checksums of one written shard, by the paths they have once committed under shards/ (a staged shard is
    read from `folder`): tar, manifest part, extract and describe markers, and its zarr blocks."""
    out = Path(out)
    sums = {}
    for phase, file in shard_file_names(name).items():
        if phase != "write":  # the completion marker carries these sums (and a timing)
            sums[f"shards/{file}"] = digest(out / folder / file)
    shard_size = _shard_size(out)
    for rel in block_files(out, block, shard_size):
        sums[rel] = digest(out / rel)
    return sums


def _shard_size(out: Path) -> int:
    """Rows per shard: the zarr chunk grid of `ts` (chunked by scan, sharded by corpus shard) is one shard high."""
    meta = json.loads((out / "timeseries.zarr" / "ts" / "zarr.json").read_text())
    return meta["chunk_grid"]["configuration"]["chunk_shape"][0]


def splits_sha256(manifest: pd.DataFrame) -> str:
    """The hash of the key -> split assignment of the usable scans (the one a model's lineage records)."""
    ok = manifest[manifest["status"] == "ok"]
    return _sha16("".join(f"{k}\t{s}\n" for k, s in sorted(zip(ok["key"], ok["split"]))).encode())


def make_record(out: Path, *, version: int, parent: int | None, sources: list[str], source_files: str | None,
                shards: dict[str, dict], manifest: str, manifest_df: pd.DataFrame, added: pd.DataFrame,
                known_subjects: set[str], config: dict | None = None) -> dict:
    """A version record (see the module doc); `shards`: name -> checksums of the shards this version wrote,
    `added`: their manifest rows."""
    ok = added[added["status"] == "ok"]
    subjects = set(zip(added["dataset"], added["subject"]))
    files = {name: digest(out / name) for name in FROZEN if version == 1 and (out / name).is_file()}
    files[manifest] = digest(out / manifest)
    record = {
        "format": FORMAT, "version": version, "parent": parent,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": sources, "source_files": source_files, "shards": list(shards), "manifest": manifest,
        "added": {"scans": len(added), "ok": len(ok), "failed": len(added) - len(ok),
                  "subjects": len({s for s in subjects if f"{s[0]}-{s[1]}" not in known_subjects}),
                  "sessions_of_known_subjects": int(sum(f"{d}-{s}" in known_subjects
                                                        for d, s in zip(added["dataset"], added["subject"])))},
        "totals": {"scans": len(manifest_df), "ok": int((manifest_df["status"] == "ok").sum()),
                   "splits": {str(k): int(v) for k, v in manifest_df["split"].value_counts().sort_index().items()}},
        "fingerprints": {"splits_sha256": splits_sha256(manifest_df),
                         "norms_sha256": _sha16((out / "norms.json").read_bytes()),
                         "manifest_sha256": files[manifest][1][:16]},
        "checksums": {"files": files, "shards": shards},
    }
    if config is not None:
        record["config"] = config
    return record


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_versions(out: Path) -> list[dict]:
    """The version records named by complete.json's version (1 .. current), oldest first; a record missing or not
    matching its number is a one-line error."""
    out = Path(out)
    record = finished_record(out)
    current = record.get("version")
    if current is None:
        raise InputError(f"{out}: built before corpora recorded versions, so no checksums were written with its "
                         "shards; rebuild it (or `fmrilm corpus add` records its version 1 from the files as they are)")
    versions = []
    for v in range(1, int(current) + 1):
        path = out / version_path(v)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: version record unreadable ({type(err).__name__}); the corpus's history is "
                             "broken") from None
        if data.get("format") != FORMAT or data.get("version") != v:
            raise InputError(f"{path}: not the record of version {v}")
        versions.append(data)
    return versions


def key_versions(out: Path, manifest: pd.DataFrame) -> pd.Series:
    """The version that added each manifest row (1 for a manifest written before versions)."""
    return manifest["version"].fillna(1).astype(int) if "version" in manifest else pd.Series(1, manifest.index)


def check_frozen(out: Path, versions: list[dict]) -> None:
    """Before an add: the files the current version names are the ones it recorded (manifest, norms, reference,
    ROI table); a one-line error naming the first that is not."""
    first, last = versions[0], versions[-1]
    for name, recorded in [*first["checksums"]["files"].items(), *last["checksums"]["files"].items()]:
        if name not in FROZEN and name != last["manifest"]:
            continue
        path = Path(out) / name
        if not path.is_file() or digest(path) != recorded:
            raise InputError(f"{path}: does not match version {last['version']}'s record (run `fmrilm corpus "
                             "verify`); nothing was added")


# ---- verify ---------------------------------------------------------------------------------------------

def verify(out: Path) -> dict:
    """Every file every version recorded, checked against its checksum, and the zarr `keys` array against the
    manifest. Returns {"version", "files_checked", "problems": [{"path", "shard", "problem"}], "damaged_shards"}."""
    out = Path(out)
    versions = read_versions(out)
    problems: list[dict] = []
    checked = 0

    def check(rel: str, recorded: list, shard: str | None) -> None:
        nonlocal checked
        checked += 1
        path = out / rel
        if not path.is_file():
            problems.append({"path": rel, "shard": shard, "problem": "missing"})
            return
        size = os.path.getsize(path)
        if size != recorded[0]:
            what = "truncated" if size < recorded[0] else "grown"
            problems.append({"path": rel, "shard": shard,
                             "problem": f"{what}: {size} bytes, {recorded[0]} recorded"})
        elif digest(path)[1] != recorded[1]:
            problems.append({"path": rel, "shard": shard, "problem": "content changed (sha256 differs)"})

    for record in versions:
        for rel, recorded in record["checksums"]["files"].items():
            check(rel, recorded, None)
        for shard, sums in record["checksums"]["shards"].items():
            for rel, recorded in sums.items():
                check(rel, recorded, shard)
    for record in versions:  # a changed manifest: name the row, from the shards' own parts
        for problem in problems:
            if problem["path"] == record["manifest"] and problem["problem"] != "missing":
                problem["problem"] += _changed_row(out, versions, record)
    complete = json.loads((out / COMPLETE).read_text())
    listed = sorted(s for r in versions for s in r["shards"])
    if sorted(complete.get("shards", [])) != listed:
        problems.append({"path": COMPLETE, "shard": None, "problem": "lists other shards than the version records"})
    problems += _check_keys(out, versions[-1])
    return {"version": versions[-1]["version"], "files_checked": checked, "problems": problems,
            "damaged_shards": sorted({p["shard"] for p in problems if p["shard"]})}


def version_manifest(out: Path, versions: list[dict], record: dict) -> pd.DataFrame:
    """A version's manifest as its build or add wrote it: the manifest parts of its shards and of every earlier
    version's, in the order they were written."""
    parts = [pd.read_parquet(out / "shards" / shard_file_names(name)["manifest"])
             for r in versions[: record["version"]] for name in r["shards"]]
    return pd.concat(parts, ignore_index=True)


def _changed_row(out: Path, versions: list[dict], record: dict) -> str:
    try:
        found = pd.read_parquet(out / record["manifest"])
        expected = version_manifest(out, versions, record)
    except Exception:  # an unreadable manifest or part: the checksum line says enough
        return ""
    if list(found.columns) != list(expected.columns) or len(found) != len(expected):
        return f"; {len(found)} rows x {len(found.columns)} columns, its shards hold {len(expected)} x " \
               f"{len(expected.columns)}"
    for i in range(len(found)):
        a, b = found.iloc[i], expected.iloc[i]
        for column in found.columns:
            if not (a[column] == b[column] or (pd.isna(a[column]) and pd.isna(b[column]))):
                return f"; row of scan {b['key']}: {column} is {a[column]!r}, its shard records {b[column]!r}"
    return ""


def _check_keys(out: Path, last: dict) -> list[dict]:
    import zarr

    try:
        manifest = pd.read_parquet(out / last["manifest"])
        stored = zarr.open_group(out / "timeseries.zarr", mode="r")["keys"][:]
    except Exception as err:  # a damaged manifest is reported by its checksum; zarr metadata by this
        return [{"path": "timeseries.zarr/keys", "shard": None, "problem": f"unreadable ({type(err).__name__})"}]
    ok = manifest[manifest["status"] == "ok"]
    for key, row, shard in zip(ok["key"], ok["index"].astype(int), ok["shard"]):
        if row >= len(stored) or stored[row] != key:
            return [{"path": "timeseries.zarr/keys", "shard": shard,
                     "problem": f"row {row} does not hold scan {key} (manifest and zarr disagree)"}]
    return []
