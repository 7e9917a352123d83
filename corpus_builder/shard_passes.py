"""The per-scan work of `fmrilm corpus build` (`corpus_builder.build` runs it): the plan's shards and the three
passes over one shard, each a Ray task that owns its shard's zarr rows and tar.

    plan_shards     scans ordered by (split, key), cut into shards of `shard_size`; shard i owns zarr rows
                    [i * shard_size, (i + 1) * shard_size) and tar `shards/{split}-{i:06d}.tar`
    extract_shard   raw scans -> clean X [T, N] into zarr `ts`; failures recorded in the pass's marker
    describe_shard  X -> the 23 descriptors and 28 network-pair values into zarr (with the fitted reference)
    write_shard     z-values (with the fitted norms), caption, instruction items -> the webdataset tar, the shard's
                    manifest part, then `{shard}_stats.json` last

Each pass leaves a marker per shard (written atomically) and returns what it recorded when the marker exists, so a
re-run redoes only what a killed task left unmarked. Tar members have a fixed mtime and captions a per-scan seed
from the key: the same inputs give byte-identical tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds
import zarr

from corpus_builder import sources
from corpus_builder.captions import caption_for
from corpus_builder.config import CorpusConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES, Descriptors, compute_descriptors
from corpus_builder.extraction import failure_reason
from corpus_builder.instructions import instruction_items
from corpus_builder.norms import Norms, load_reference
from corpus_builder.polish import CaptionPolisher
from corpus_builder.records import PHENOTYPES, ScanRecord
from corpus_builder.splits import SPLITS
from corpus_builder.versions import shard_checksums, shard_file_names

TAR_MTIME = 0.0  # fixed tar member times: rebuilds are byte-identical


@dataclass
class Shard:
    name: str                      # e.g. "train-000003"
    split: str
    row0: int                      # first zarr row it owns
    records: list[ScanRecord] = field(default_factory=list)
    version: int = 1               # the corpus version that adds it (`corpus_builder.versions`)
    folder: str = "shards"         # where its tar and markers are written (an add stages them apart)


def plan_shards(records: list[ScanRecord], splits: dict[str, str], shard_size: int, *, first_row: int = 0,
                first_index: dict[str, int] | None = None, version: int = 1, folder: str = "shards") -> list[Shard]:
    """`first_row` / `first_index` (per split): where an add's new shards continue the corpus's rows and names."""
    shards: list[Shard] = []
    for split in SPLITS:
        members = sorted((r for r in records if splits[r.key] == split), key=lambda r: r.key)
        for i in range(0, len(members), shard_size):
            index = (first_index or {}).get(split, 0) + len([s for s in shards if s.split == split])
            shards.append(Shard(f"{split}-{index:06d}", split, first_row + len(shards) * shard_size,
                                members[i:i + shard_size], version, folder))
    return shards


def _marker(out: Path, shard: Shard, phase: str) -> Path:
    return out / shard.folder / shard_file_names(shard.name)[phase]


def _scan_seed(seed: int, key: str) -> int:
    """Per-scan seed from the key alone: a caption does not change when other scans change."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") ^ seed


# ---- the three per-shard passes (Ray tasks) ------------------------------------------------------------

def extract_shard(shard: Shard, cfg: CorpusConfig, out: Path) -> dict:
    marker = _marker(out, shard, "extract")
    if marker.exists():
        return json.loads(marker.read_text())
    ts = zarr.open_group(out / "timeseries.zarr", mode="r+")["ts"]
    block = np.zeros((len(shard.records), cfg.source.cleaning.length, cfg.source.atlas.n_rois), np.float32)
    failures, labels, networks = {}, None, None
    for i, rec in enumerate(shard.records):
        x, rec_labels = sources.extract(rec, cfg.source)
        if x is not None:
            block[i] = x
            labels = labels or rec_labels
            networks = networks or rec.extra.get("networks")
        failures[rec.key] = {"error": rec.error, "qc": rec.qc}
    ts[shard.row0:shard.row0 + len(block)] = block
    result = {"scans": failures, "labels": labels, "networks": networks}
    _write_atomic(marker, json.dumps(result, sort_keys=True))
    return result


def describe_shard(shard: Shard, ok_rows: list[int], cfg: CorpusConfig, out: Path) -> None:
    marker = _marker(out, shard, "describe")
    if marker.exists():
        return
    group = zarr.open_group(out / "timeseries.zarr", mode="r+")
    reference = load_reference(out / "reference.npz", cfg.descriptors)
    n = len(shard.records)
    desc = np.full((n, len(DESCRIPTOR_NAMES)), np.nan, np.float32)
    pairs = np.full((n, len(PAIR_NAMES)), np.nan, np.float32)
    missing = {}
    for row in ok_rows:
        d = compute_descriptors(group["ts"][row], reference, cfg.source.cleaning.tr)
        desc[row - shard.row0] = d.vector()
        pairs[row - shard.row0] = [d.fc_pairs[p] for p in PAIR_NAMES]
        missing[shard.records[row - shard.row0].key] = d.missing
    group["descriptors"][shard.row0:shard.row0 + n] = desc
    group["fc_pairs"][shard.row0:shard.row0 + n] = pairs
    _write_atomic(marker, json.dumps(missing, sort_keys=True))


def write_shard(shard: Shard, split_of: dict[str, str], extracted: dict, cfg: CorpusConfig, out: Path,
                seed: int) -> dict:
    marker = _marker(out, shard, "write")
    if marker.exists():
        return json.loads(marker.read_text())
    start = time.perf_counter()
    group = zarr.open_group(out / "timeseries.zarr", mode="r")
    norms = Norms.load(out / "norms.json")
    missing_all = json.loads(_marker(out, shard, "describe").read_text())
    n = len(shard.records)
    ts = group["ts"][shard.row0:shard.row0 + n]
    desc = group["descriptors"][shard.row0:shard.row0 + n]
    pairs = group["fc_pairs"][shard.row0:shard.row0 + n]
    rows, failures = [], Counter()
    polisher = CaptionPolisher.from_config(cfg.captions, out / "caption_cache") if cfg.captions.polish else None
    folder = out / shard.folder
    part = folder / f"{shard.name}.tar.part"
    with wds.TarWriter(str(part), mtime=TAR_MTIME) as tar:
        for i, rec in enumerate(shard.records):
            info = extracted[rec.key]
            row = {"key": rec.key, "dataset": rec.dataset, "subject": rec.subject, "session": rec.session,
                   "run": rec.run, "site": rec.site, "split": split_of[rec.key], "status": "ok",
                   "error": None, "source": rec.loader, "shard": shard.name, "index": shard.row0 + i,
                   "version": shard.version}
            row.update({p: rec.phenotypes.get(p) for p in PHENOTYPES})
            if info["error"]:
                row.update(status="failed", error=info["error"], index=-1)
                failures[failure_reason(info["error"])] += 1
                rows.append(row)
                continue
            d = Descriptors(dict(zip(DESCRIPTOR_NAMES, desc[i].astype(float).tolist())),
                            dict(zip(PAIR_NAMES, pairs[i].astype(float).tolist())), missing_all[rec.key])
            z, pair_z = norms.z(d)
            scan_seed = _scan_seed(seed, rec.key)
            caption = caption_for(z, pair_z, d.missing, cfg.captions, scan_seed, d.values)
            if polisher is not None:  # keeps the raw caption when the rewrite loses a claim
                caption, _ = polisher.polish(caption)
            qa = instruction_items(rec.phenotypes, caption, scan_seed, cfg.instructions)
            meta = {"dataset": rec.dataset, "site": rec.site, "split": split_of[rec.key], "session": rec.session,
                    "run": rec.run, "phenotypes": rec.phenotypes, "qc": info["qc"]}
            buf = io.BytesIO()
            np.save(buf, ts[i], allow_pickle=False)
            tar.write({
                "__key__": rec.key,
                "ts.npy": buf.getvalue(),
                "desc.json": _json({"descriptors": {k: {"value": d.values[k], "z": z[k]} for k in DESCRIPTOR_NAMES},
                                    "fc_pairs": {k: {"value": d.fc_pairs[k], "z": pair_z[k]} for k in PAIR_NAMES},
                                    "missing": d.missing}),
                "caption.txt": caption.encode(),
                "qa.json": _json(qa),
                "meta.json": _json(meta),
            })
            rows.append(row)
    os.replace(part, folder / f"{shard.name}.tar")
    pd.DataFrame(rows).to_parquet(folder / f"{shard.name}_manifest.parquet", index=False)
    stats = {"shard": shard.name, "split": shard.split, "scans": n, "ok": n - sum(failures.values()),
             "failed": sum(failures.values()), "failed_by_reason": dict(sorted(failures.items())),
             "write_seconds": round(time.perf_counter() - start, 3),
             "checksums": shard_checksums(out, shard.name, shard.row0 // cfg.build.shard_size, shard.folder)}
    _write_atomic(marker, json.dumps(stats, sort_keys=True, indent=1))  # last: the completion marker
    return stats


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename: a kill -9 mid-write never leaves a truncated marker that would block every resume."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, allow_nan=True, default=_plain).encode()


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)
