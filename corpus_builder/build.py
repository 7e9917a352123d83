"""`fmrilm corpus build`: sources -> a sharded corpus (docs/design.md), as Ray tasks that each own whole shards.

Plan. Discovery and subject-level splits happen on the driver. Scans are ordered by (split, key) and cut
into shards of `shard_size` scans; shard i of the corpus owns zarr rows [i * shard_size, (i + 1) * shard_size)
and tar `shards/{split}-{i:06d}.tar`, so no two tasks ever write the same zarr shard or tar.

Three passes, each a Ray task per shard (`corpus_builder.shard_passes`), so every scan is extracted once and
described once:
1. extract: raw scan -> clean X[T, N] into zarr `ts` (failures recorded in a per-shard part file);
2. describe: X -> the 23 descriptors and 28 pair values into zarr, once the driver has fitted the
   reference (group ICA, gradient template) on up to `reference.max_fit_scans` train scans of the
   reference dataset;
3. write: after the driver fitted the norms on the reference cohort's descriptors: z-values, caption,
   instruction items -> the webdataset tar, the shard's manifest part, then `{shard}_stats.json` last.

Resume: each pass leaves a marker per shard; a re-run skips what is marked and redoes the rest (a killed
task leaves no marker). The same inputs and config give byte-identical tars (fixed mtime, sorted JSON,
seeded captions, seeded Louvain / ICA). A corpus built with another config, seed or source files is refused
unless `overwrite`.

Finished: the last thing a build writes is `complete.json` (config fingerprint, seed, a fingerprint of the
source files, the summary). A build over a finished corpus of the same inputs returns that summary before
discovering sources or starting Ray (`finished_build`), in the time it takes to list the source folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import zarr

from corpus_builder import sources
from corpus_builder.atlas import roi_table
from corpus_builder.config import CorpusConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES, Descriptors
from corpus_builder.extraction import discover_all, pseudonymizer_for
from corpus_builder.norms import Norms, fit_reference, save_reference
from corpus_builder.privacy import KEY_ENV, KEY_FILE_ENV
from corpus_builder.records import ScanRecord
from corpus_builder.shard_passes import (  # noqa: F401  (Shard, TAR_MTIME: importable from here as before)
    TAR_MTIME,
    Shard,
    _write_atomic,
    describe_shard,
    extract_shard,
    plan_shards,
    write_shard,
)
from corpus_builder.splits import assign_splits
from corpus_builder.versions import (  # noqa: F401  (COMPLETE, STARTED: importable from here as before)
    COMPLETE,
    STARTED,
    make_record,
    shard_checksums,
    version_path,
    write_json_atomic,
)
from fmrilm_core.errors import InputError


def config_fingerprint(cfg: CorpusConfig, specs: list[str]) -> str:
    """What the corpus content depends on (not how many workers built it)."""
    content = cfg.model_dump(mode="json", exclude={"build": {"workers", "cpus_per_task", "task_retries"}})
    blob = json.dumps({"config": content, "sources": specs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_fingerprint(specs: list[str], cfg: CorpusConfig, out: Path | None = None) -> str | None:
    """What a build reads, cheaply: path, size and mtime of every file under the source roots (`out` left out
    when it lies inside one) and of the files the config names, and the pseudonym secret in use (hashed: it
    decides every key). Only directory listings and stats, no file is opened. None when a root or the key
    file is missing (the build then says what is wrong)."""
    digest = hashlib.sha256()
    skip = Path(out).resolve() if out is not None else None
    for spec in specs:
        root = sources.parse_source(spec)[1]
        if not root.is_dir():
            return None
        digest.update(f"root\0{spec}\n".encode())
        _hash_tree(digest, root, skip)
    atlas, captions = cfg.source.atlas, cfg.captions
    named = [*atlas.images, *atlas.labels, atlas.cifti_labels, atlas.lookup, cfg.source.ukb.phenotypes,
             Path(captions.polish_model) if captions.polish and captions.polish_model else None]
    for path in (Path(p) for p in named if p is not None):
        digest.update(f"named\0{path}\n".encode())
        if path.is_dir():
            _hash_tree(digest, path, skip)
        elif path.exists():
            stat = path.stat()
            digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if os.environ.get(KEY_ENV):
        digest.update(b"key\0" + hashlib.sha256(os.environ[KEY_ENV].encode()).digest())
    elif os.environ.get(KEY_FILE_ENV):
        key_file = Path(os.environ[KEY_FILE_ENV])
        if not key_file.is_file():
            return None
        digest.update(b"key\0" + hashlib.sha256(key_file.read_bytes().strip()).digest())
    return digest.hexdigest()[:16]


def _hash_tree(digest, root: Path, skip: Path | None) -> None:
    for folder, dirs, files in os.walk(root, followlinks=True):
        if skip is not None and Path(folder).resolve() == skip:
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:  # a dangling link: its name still counts
                digest.update(f"{os.path.relpath(path, root)}\0?\n".encode())
                continue
            digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def finished_build(specs: list[str], cfg: CorpusConfig, out: Path, seed: int = 0) -> dict | None:
    """The summary of `out` when it is a finished corpus of these sources, config and seed, else None.

    Cheap checks first (the completion record, the config fingerprint, the outputs it names); the source
    listing only when they pass."""
    out = Path(out)
    try:
        record = json.loads((out / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != config_fingerprint(cfg, specs) or record.get("seed") != seed:
        return None
    outputs = [STARTED, "manifest.parquet", "norms.json", "rois.tsv", "reference.npz", "summary.json",
               "timeseries.zarr/zarr.json"]
    outputs += [f"shards/{name}{suffix}" for name in record.get("shards", [])
                for suffix in (".tar", "_stats.json", "_manifest.parquet")]
    if not all((out / name).exists() for name in outputs):
        return None
    if record.get("source_files") != source_fingerprint(specs, cfg, out):
        return None
    return record["summary"]


# ---- the driver ---------------------------------------------------------------------------------------

def identity_of(specs: list[str]) -> dict:
    """What the completion record says of who the scans are (read back by `corpus_builder.lineage`): the
    fingerprint of the pseudonym scheme (never the secret: two corpora with the same one give a subject the same
    pseudonym) and whether every source is a synthetic cohort (`fmrilm synth` writes ROOT/synth.json)."""
    roots = [sources.resolve(spec)[1] for spec in specs]
    return {"pseudonym_scheme": pseudonymizer_for(roots).scheme_fingerprint(),
            "synthetic": bool(roots) and all((Path(root) / "synth.json").is_file() for root in roots)}


def _prepare_out(out: Path, inputs: dict, overwrite: bool) -> None:
    """Keep `out` to resume it when it was started from the same inputs (config, seed, source files: a key
    recorded by an older build is not compared), else refuse it unless `overwrite`."""
    build_file = out / STARTED
    if build_file.exists():
        previous = json.loads(build_file.read_text())
        if previous.get("fingerprint") != inputs["fingerprint"]:
            problem = "another config or sources"
        elif previous.get("seed", inputs["seed"]) != inputs["seed"]:
            problem = f"another seed ({previous['seed']})"
        elif previous.get("source_files", inputs["source_files"]) not in (inputs["source_files"], None):
            problem = "source files that have changed since"
        else:
            problem = None
        if problem:
            if not overwrite:
                grow = " or `fmrilm corpus add` to add scans to it" if (out / COMPLETE).is_file() else ""
                raise InputError(f"{out}: holds a corpus built with {problem} (use --overwrite to replace it{grow})")
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out}: exists and is not a corpus (use --overwrite to replace it)")
        shutil.rmtree(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)


def _create_arrays(out: Path, n_rows: int, shard_size: int, cfg: CorpusConfig, keys: list[str]) -> None:
    path = out / "timeseries.zarr"
    # the last shard of each split is filled up with rows that hold no scan (empty key, zeros, NaN
    # descriptors); readers skip the rows listed here
    padding = [row for row, key in enumerate(keys) if not key]
    if (path / "zarr.json").exists():  # resuming: arrays exist and hold finished shards
        group = zarr.open_group(path, mode="r+")
        if group.attrs.get("padding_rows") != padding:  # a corpus started before the attribute existed
            group.attrs["padding_rows"] = padding
        return
    t, n = cfg.source.cleaning.length, cfg.source.atlas.n_rois
    group = zarr.open_group(path, mode="w", attributes={"padding_rows": padding})
    group.create_array("ts", shape=(n_rows, t, n), chunks=(1, t, n), shards=(shard_size, t, n), dtype="float32",
                       fill_value=0.0)
    group.create_array("descriptors", shape=(n_rows, len(DESCRIPTOR_NAMES)), chunks=(shard_size, len(DESCRIPTOR_NAMES)),
                       dtype="float32", fill_value=np.nan, attributes={"names": list(DESCRIPTOR_NAMES)})
    group.create_array("fc_pairs", shape=(n_rows, len(PAIR_NAMES)), chunks=(shard_size, len(PAIR_NAMES)),
                       dtype="float32", fill_value=np.nan, attributes={"names": list(PAIR_NAMES)})
    # chunked by shard like the others: an add writes new blocks and never rewrites a finished one
    group.create_array("keys", shape=(n_rows,), chunks=(shard_size,), dtype=str)[:] = np.array(keys)


def build_corpus(specs: list[str], cfg: CorpusConfig, out: Path, seed: int = 0, overwrite: bool = False,
                 progress=None, ray_address: str | None = None, records: list[ScanRecord] | None = None) -> dict:
    """Build the corpus into `out`; returns the summary.

    `progress(n)` is called as shards finish each of the three passes (3 x scans in all).
    """
    start = time.perf_counter()
    out = Path(out)
    finished = finished_build(specs, cfg, out, seed)
    if finished is not None:  # nothing to do: no discovery, no Ray
        return finished
    records = records if records is not None else discover_all(specs, cfg.source)  # callers may have discovered
    inputs = {"fingerprint": config_fingerprint(cfg, specs), "seed": seed,
              "source_files": source_fingerprint(specs, cfg, out)}
    _prepare_out(out, inputs, overwrite)
    (out / COMPLETE).unlink(missing_ok=True)  # a resumed build is not complete until it ends
    (out / STARTED).write_text(json.dumps(inputs | {"sources": specs}, indent=1))
    built_with = cfg.model_dump(mode="json")  # what an add builds its scans with (sizes unset stay unset)
    cfg = cfg.model_copy(update={"source": sources.with_roi_count(records, cfg.source)})  # N from the data if unset

    table = pd.DataFrame({"key": [r.key for r in records], "subject": [r.subject for r in records],
                          "dataset": [r.dataset for r in records],
                          "diagnosis": [r.phenotypes.get("diagnosis") for r in records]})
    split_of = dict(zip(table["key"], assign_splits(table, tuple(cfg.splits.fractions), seed)))
    size = cfg.build.shard_size
    shards = plan_shards(records, split_of, size)
    keys = [""] * (len(shards) * size)
    for shard in shards:
        for i, rec in enumerate(shard.records):
            keys[shard.row0 + i] = rec.key
    _create_arrays(out, len(keys), size, cfg, keys)

    def fit_reference_and_rois(extracted: dict, labels: list, networks) -> None:
        rois = roi_table(labels, cfg.source.atlas.lookup or networks)
        rois.to_csv(out / "rois.tsv", sep="\t", index=False)
        ok = [k for k, v in extracted.items() if not v["error"]]
        reference_keys[:] = sorted(k for k in ok if split_of[k] == "train" and
                                   cfg.reference.dataset in (None, dataset_of[k]))
        if len(reference_keys) < 2:
            raise InputError(f"reference cohort (train split of {cfg.reference.dataset or 'all datasets'}) has "
                             f"{len(reference_keys)} usable scans; need at least 2")
        if not (out / "reference.npz").exists():
            rng = np.random.default_rng(seed)
            fit_keys = sorted(rng.choice(reference_keys, min(len(reference_keys), cfg.reference.max_fit_scans),
                                         replace=False))
            ts = zarr.open_group(out / "timeseries.zarr", mode="r")["ts"]
            reference = fit_reference([ts[row_of[k]] for k in fit_keys], rois["network"].to_numpy(),
                                      cfg.descriptors, seed)
            save_reference(reference, out / "reference.tmp.npz")
            os.replace(out / "reference.tmp.npz", out / "reference.npz")

    def fit_norms() -> None:
        if not (out / "norms.json").exists():
            group = zarr.open_group(out / "timeseries.zarr", mode="r")
            desc, pairs = group["descriptors"][:], group["fc_pairs"][:]
            cohort = [Descriptors(dict(zip(DESCRIPTOR_NAMES, desc[row_of[k]].astype(float))),
                                  dict(zip(PAIR_NAMES, pairs[row_of[k]].astype(float))), {}) for k in reference_keys]
            Norms.fit(cohort, f"{cfg.reference.dataset or 'all'}/train").save(out / "norms.json.tmp")
            os.replace(out / "norms.json.tmp", out / "norms.json")

    row_of = {rec.key: s.row0 + i for s in shards for i, rec in enumerate(s.records)}
    dataset_of = {r.key: r.dataset for r in records}
    reference_keys: list[str] = []
    _init_ray(ray_address, cfg)
    stats = run_passes(shards, split_of, cfg, out, seed, progress, fit_reference_and_rois, fit_norms)
    manifest = pd.concat([pd.read_parquet(out / "shards" / f"{s.name}_manifest.parquet") for s in shards])
    manifest.to_parquet(out / "manifest.parquet", index=False)
    seconds = time.perf_counter() - start
    failed = Counter()
    for st in stats:
        failed.update(st["failed_by_reason"])
    summary = {"scans": len(records), "ok": int((manifest["status"] == "ok").sum()),
               "failed": int((manifest["status"] == "failed").sum()), "failed_by_reason": dict(failed),
               "shards": len(shards), "splits": manifest["split"].value_counts().to_dict(),
               "seconds": round(seconds, 2), "scans_per_s": round(len(records) / max(seconds, 1e-9), 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    sums = {st["shard"]: st.get("checksums") or shard_checksums(out, st["shard"], i, "shards")
            for i, st in enumerate(stats)}
    version = make_record(out, version=1, parent=None, sources=specs, source_files=inputs["source_files"],
                          shards=sums, manifest="manifest.parquet", manifest_df=manifest, added=manifest,
                          known_subjects=set(), config=built_with)
    write_json_atomic(out / version_path(1), version)
    record = inputs | {"shards": [s.name for s in shards], "summary": summary, **identity_of(specs),
                       "version": 1, "manifest": "manifest.parquet"}
    _write_atomic(out / COMPLETE, json.dumps(record, indent=1))  # last: the corpus is finished
    return summary


def run_passes(shards: list[Shard], split_of: dict[str, str], cfg: CorpusConfig, out: Path, seed: int, progress,
               after_extract=None, after_describe=None) -> list[dict]:
    """The three passes over `shards` as Ray tasks (extract, describe, write); returns the write pass's stats per
    shard. `after_extract(extracted, labels, networks)` and `after_describe()` run on the driver between them (a
    build fits the reference and the norms there; an add keeps them frozen)."""
    # retried on a lost worker and on an exception: a pass is idempotent per shard (markers, atomic tar rename)
    opts = {"num_cpus": cfg.build.cpus_per_task, "max_retries": cfg.build.task_retries, "retry_exceptions": True}
    remote_extract = ray.remote(**opts)(extract_shard)
    remote_describe = ray.remote(**opts)(describe_shard)
    remote_write = ray.remote(**opts)(write_shard)

    extracted: dict[str, dict] = {}
    labels, networks = None, None
    weights = [len(s.records) for s in shards]
    for result in _gather([remote_extract.remote(s, cfg, out) for s in shards], progress, weights):
        extracted.update(result["scans"])
        labels = labels or result["labels"]
        networks = networks or result["networks"]
    if labels is None:
        first = next(iter(v["error"] for v in extracted.values()), "?")
        raise InputError(f"no scan could be extracted (first failure: {first})")
    if after_extract is not None:
        after_extract(extracted, labels, networks)
    ok_rows = {s.name: [s.row0 + i for i, r in enumerate(s.records) if not extracted[r.key]["error"]] for s in shards}
    _gather([remote_describe.remote(s, ok_rows[s.name], cfg, out) for s in shards], progress, weights)
    if after_describe is not None:
        after_describe()
    return _gather([remote_write.remote(s, split_of, {r.key: extracted[r.key] for r in s.records}, cfg, out, seed)
                    for s in shards], progress, weights)


def _init_ray(address: str | None, cfg: CorpusConfig) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:  # "local": a bare ray.init() would attach to a cluster `ray start` recorded in /tmp/ray
        ray.init(address="local", num_cpus=cfg.build.workers or None, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)


def _gather(refs: list, progress, weights: list[int] | None = None) -> list:
    """Wait for tasks in completion order, report progress, return results in submission order."""
    weight_of = dict(zip(refs, weights or [0] * len(refs)))
    index_of = {ref: i for i, ref in enumerate(refs)}
    results = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[index_of[done[0]]] = ray.get(done[0])
        if progress is not None:
            progress(weight_of[done[0]])
    return results
