"""A corpus that grows and mends: `fmrilm corpus add` and `fmrilm corpus verify --repair` (docs/corpus.md).

add. The new scans of a source (keys the corpus does not hold; re-adding a source adds nothing) are built into new
shards beside the finished ones, which are never opened for writing: the zarr arrays grow by whole row blocks, the
new tars, manifest parts and markers are staged under `staging/shards/`, and the norms and reference fit stay
frozen (new scans are z-scored against them; a refit is a new corpus, `corpus build --overwrite`). A subject already
in the corpus keeps its split (new sessions join it there); a new subject gets the split the first build's keyed
rule (`splits.assign_splits` over all subjects) gives it. Nothing is written before the checks pass: a finished
corpus, version records that match the files, the corpus's own config, the same ROI count, atlas labels and
pseudonym secret.

Commit. `staging/add.json` (the plan) is written first; the three passes run as in a build (Ray tasks, markers,
resume); then the staged files move under shards/, the version's manifest and record are written, and complete.json
is replaced last: until that rename the corpus is its previous version for every reader (readers list the shards
complete.json names and read the manifest it names). A kill at any point leaves the previous version readable, and
the next `add` of the same source resumes (an interrupted commit rolls forward).

repair. The shards `verify` names as damaged are rebuilt from the sources of the version that added them (the
markers, tar, manifest part and zarr blocks deleted, the three passes rerun with the frozen fits): the same inputs
give the same bytes, so the repaired corpus verifies again. A version's manifest is rebuilt from the shards' parts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from corpus_builder import sources
from corpus_builder.build import (
    _init_ray,
    _write_atomic,
    config_fingerprint,
    identity_of,
    run_passes,
    source_fingerprint,
)
from corpus_builder.config import CorpusConfig
from corpus_builder.extraction import discover_all
from corpus_builder.metadata import read_manifest, read_rois
from corpus_builder.shard_passes import Shard, plan_shards
from corpus_builder.splits import SPLITS, assign_splits
from corpus_builder.versions import (
    COMPLETE,
    FROZEN,
    STARTED,
    check_frozen,
    finished_record,
    make_record,
    read_versions,
    shard_checksums,
    shard_file_names,
    verify,
    version_manifest,
    version_path,
    write_json_atomic,
)
from fmrilm_core.errors import InputError

STAGING = "staging"
PLAN = f"{STAGING}/add.json"
ARRAYS = ("ts", "descriptors", "fc_pairs", "keys")


def corpus_config(out: Path, cfg: CorpusConfig | None = None) -> CorpusConfig:
    """The config the corpus was built with (version 1's record). `cfg`, when given, may differ only in how a build
    runs (workers, CPUs per task, retries) and is then used; a content difference is a one-line error. A corpus
    built before versions has no stored config: `cfg` is required and must give the build's fingerprint."""
    out = Path(out)
    record = finished_record(out)
    first = out / version_path(1)
    stored = json.loads(first.read_text()).get("config") if first.is_file() else None
    if stored is None:
        sources_ = json.loads((out / STARTED).read_text()).get("sources", [])
        if cfg is None or config_fingerprint(cfg, sources_) != record.get("fingerprint"):
            raise InputError(f"{out}: built before corpora recorded their config; pass the --config (and --set) it "
                             "was built with")
        return cfg
    built = CorpusConfig.model_validate(stored)
    if cfg is None:
        return built
    if config_fingerprint(cfg, []) != config_fingerprint(built, []):
        changed = _first_change(cfg.model_dump(mode="json"), built.model_dump(mode="json"), "corpus")
        raise InputError(f"{out}: {changed} differs from the config the corpus was built with; an add builds "
                         "its scans exactly like the first build (a new config is a new corpus)")
    return cfg


def _first_change(ours, theirs, path: str) -> str:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in theirs:
            if ours.get(key) != theirs[key] and key not in ("workers", "cpus_per_task", "task_retries"):
                return _first_change(ours.get(key), theirs[key], f"{path}.{key}")
    return path


def _adopt(out: Path, cfg: CorpusConfig, record: dict) -> None:
    """A corpus built before versions: write its version 1 (checksums of its files as they are, its config), with
    the first add's plan, after every check."""
    started = json.loads((out / STARTED).read_text())
    manifest = read_manifest(out)
    sums = {name: shard_checksums(out, name, i, "shards") for i, name in enumerate(record["shards"])}
    first = make_record(out, version=1, parent=None, sources=started.get("sources", []),
                        source_files=record.get("source_files"), shards=sums, manifest="manifest.parquet",
                        manifest_df=manifest, added=manifest, known_subjects=set(), config=cfg.model_dump(mode="json"))
    first["recorded"] = "after the build, by its first `corpus add` (checksums of the files as they were then)"
    write_json_atomic(out / version_path(1), first)
    _write_atomic(out / COMPLETE, json.dumps(record | {"version": 1, "manifest": "manifest.parquet"}, indent=1))


# ---- add ----------------------------------------------------------------------------------------------------

def add_to_corpus(specs: list[str], out: Path, cfg: CorpusConfig | None = None, *, progress=None,
                  ray_address: str | None = None) -> dict:
    """Add the new scans of `specs` to the finished corpus `out` as a new version; returns what was added
    ({"version", "added": 0} when the sources hold no scan the corpus lacks). `cfg`: the corpus's own config when
    None (see `corpus_config`); `progress(description, total)`: a context manager yielding `advance(n)` (e.g.
    `fmrilm.progress.progress_bar`)."""
    start = time.perf_counter()
    out = Path(out)
    record = finished_record(out)
    cfg = corpus_config(out, cfg)
    legacy = record.get("version") is None  # built before versions: its version 1 is written with this add's plan
    current = 1
    if not legacy:
        versions = read_versions(out)
        check_frozen(out, versions)
        current = versions[-1]["version"]
    seed = int(record["seed"])
    plan = json.loads((out / PLAN).read_text()) if (out / PLAN).is_file() else None
    if plan is not None and plan["sources"] != specs:
        raise InputError(f"{out}: an add of {','.join(plan['sources'])} was interrupted; rerun `fmrilm corpus add` "
                         "with those sources to finish it first")
    if plan is not None and plan.get("committing"):
        return _commit(out, plan, cfg, start)

    records = discover_all(specs, cfg.source)
    manifest = read_manifest(out)
    known = set(manifest["key"])
    new = [r for r in records if r.key not in known]
    if not new:
        return {"version": current, "added": 0, "scans": 0, "seconds": round(time.perf_counter() - start, 2)}
    cfg = _check_source(out, specs, new, cfg, record)
    split_of = _splits(manifest, new, cfg, seed)
    size = cfg.build.shard_size
    group = zarr.open_group(out / "timeseries.zarr", mode="r")
    first_row = int(group["keys"].shape[0]) if plan is None else int(plan["rows"][0])
    shards = plan_shards(new, split_of, size, first_row=first_row, first_index=_next_index(record["shards"]),
                         version=current + 1, folder=f"{STAGING}/shards")
    names = [s.name for s in shards]
    if plan is None:
        plan = {"sources": specs, "version": current + 1, "parent": current, "shards": names,
                "rows": [first_row, first_row + len(shards) * size], "committing": False}
        if legacy:
            _adopt(out, cfg, record)
        write_json_atomic(out / PLAN, plan)  # first: what the add writes, so a kill can be resumed
    elif plan["shards"] != names or plan["version"] != current + 1:
        raise InputError(f"{out / PLAN}: an interrupted add planned other shards than these sources give now "
                         f"(delete {out / STAGING} to start the add again)")
    (out / STAGING / "shards").mkdir(parents=True, exist_ok=True)
    _grow_arrays(out, shards, plan["rows"][1])
    _init_ray(ray_address, cfg)
    with (progress or _no_bar)(f"corpus add: {len(new)} scans x 3 passes", 3 * len(new)) as advance:
        run_passes(shards, split_of, cfg, out, seed, advance, after_extract=_labels_check(out))
    return _commit(out, plan, cfg, start)


@contextlib.contextmanager
def _no_bar(description: str, total: int):
    yield None


def _check_source(out: Path, specs: list[str], new: list, cfg: CorpusConfig, record: dict) -> CorpusConfig:
    """ROI count, atlas labels and pseudonym secret of the new scans against the corpus, before anything is
    written; returns `cfg` with the corpus's ROI count."""
    rois = read_rois(out)
    probe = cfg.source.model_copy(update={"atlas": cfg.source.atlas.model_copy(update={"n_rois": None})})
    n_new = sources.with_roi_count(new, probe).atlas.n_rois
    if n_new != len(rois):
        raise InputError(f"{specs[0]}: its scans have {n_new} ROIs, the corpus {out} has {len(rois)}; an add must "
                         "use the corpus's atlas")
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(
        update={"atlas": cfg.source.atlas.model_copy(update={"n_rois": len(rois)})})})
    first = next((r for r in new if not r.error), None)
    if first is not None:
        _, labels = sources.extract(copy.deepcopy(first), cfg.source)  # a probe: the extract pass loads it again
        if labels is not None and [str(v) for v in labels] != [str(v) for v in rois["label"]]:
            raise InputError(f"{specs[0]}: its atlas labels are not the corpus's (first difference at ROI "
                             f"{_first_difference(labels, list(rois['label']))}); an add must use the corpus's atlas")
    scheme = identity_of(specs)["pseudonym_scheme"]
    if scheme != record.get("pseudonym_scheme"):
        raise InputError(f"{specs[0]}: pseudonymised with another secret than the corpus {out}; set "
                         "FMRILM_PSEUDONYM_KEY or FMRILM_PSEUDONYM_KEY_FILE to the corpus's secret")
    return cfg


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if str(x) != str(y)), min(len(a), len(b)))


def _labels_check(out: Path):
    labels_of_corpus = [str(v) for v in read_rois(out)["label"]]

    def check(extracted: dict, labels: list, networks) -> None:
        if [str(v) for v in labels] != labels_of_corpus:
            raise InputError(f"{out}: the added scans' atlas labels are not the corpus's; nothing was committed")
    return check


def _splits(manifest: pd.DataFrame, new: list, cfg: CorpusConfig, seed: int) -> dict[str, str]:
    """Split of every new scan: its subject's split when the corpus knows the subject, else the first build's keyed
    rule over all subjects (old and new)."""
    old = manifest[["key", "subject", "dataset", "split"]].copy()
    old["diagnosis"] = manifest["diagnosis"] if "diagnosis" in manifest else None
    table = pd.concat([old.drop(columns="split"), pd.DataFrame(
        {"key": [r.key for r in new], "subject": [r.subject for r in new], "dataset": [r.dataset for r in new],
         "diagnosis": [r.phenotypes.get("diagnosis") for r in new]})], ignore_index=True)
    rule = dict(zip(table["key"], assign_splits(table, tuple(cfg.splits.fractions), seed)))
    kept = dict(zip(zip(old["dataset"], old["subject"]), old["split"]))
    return {r.key: kept.get((r.dataset, r.subject), rule[r.key]) for r in new}


def _next_index(names: list[str]) -> dict[str, int]:
    """Per split, the index the next shard takes (shard names continue: train-000004 after train-000003)."""
    return {split: 1 + max((int(n.rsplit("-", 1)[1]) for n in names if n.startswith(f"{split}-")), default=-1)
            for split in SPLITS}


def _grow_arrays(out: Path, shards: list[Shard], rows: int) -> None:
    """Resize every zarr array to `rows` (new whole blocks after the finished ones; the rows no manifest names are
    invisible to readers) and write the new rows' keys."""
    group = zarr.open_group(out / "timeseries.zarr", mode="r+")
    for name in ARRAYS:
        array = group[name]
        if array.shape[0] < rows:
            array.resize((rows, *array.shape[1:]))
    keys = np.array([""] * (rows - shards[0].row0), dtype=object)
    for shard in shards:
        for i, rec in enumerate(shard.records):
            keys[shard.row0 - shards[0].row0 + i] = rec.key
    group["keys"][shards[0].row0:rows] = keys.astype(str)


def _commit(out: Path, plan: dict, cfg: CorpusConfig, start: float) -> dict:
    """Move the staged shards in, write the version's manifest and record, then complete.json (the commit)."""
    if not plan.get("committing"):
        plan["committing"] = True
        write_json_atomic(out / PLAN, plan)
    staged, final = out / STAGING / "shards", out / "shards"
    for name in plan["shards"]:
        for file in shard_file_names(name).values():  # the completion marker last
            if (staged / file).exists():
                os.replace(staged / file, final / file)
    record = finished_record(out)
    previous = read_manifest(out)  # still the parent version's: complete.json is not yet replaced
    parts = [pd.read_parquet(final / f"{name}_manifest.parquet") for name in plan["shards"]]
    added = pd.concat(parts, ignore_index=True)
    manifest = pd.concat([previous, added], ignore_index=True)
    version = plan["version"]
    rel = f"versions/v{version:04d}.manifest.parquet"
    tmp = out / f"{rel}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(tmp, index=False)
    os.replace(tmp, out / rel)
    group = zarr.open_group(out / "timeseries.zarr", mode="r+")
    first, end = plan["rows"]
    padding = [row for row in group.attrs.get("padding_rows", []) if row < first]  # the new blocks' keys only
    group.attrs["padding_rows"] = padding + [first + i for i, key in enumerate(group["keys"][first:end]) if not key]
    sums = {name: json.loads((final / shard_file_names(name)["write"]).read_text())["checksums"]
            for name in plan["shards"]}
    known = {f"{d}-{s}" for d, s in zip(previous["dataset"], previous["subject"])}
    version_record = make_record(out, version=version, parent=plan["parent"], sources=plan["sources"],
                                 source_files=source_fingerprint(plan["sources"], cfg, out), shards=sums,
                                 manifest=rel, manifest_df=manifest, added=added, known_subjects=known)
    write_json_atomic(out / version_path(version), version_record)
    summary = _summary(manifest, record["shards"] + plan["shards"], record["summary"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _write_atomic(out / COMPLETE, json.dumps(record | {"version": version, "manifest": rel, "summary": summary,
                                                      "shards": record["shards"] + plan["shards"]}, indent=1))
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return {"version": version, "added": len(added), **version_record["added"], "shards": len(plan["shards"]),
            "splits": added["split"].value_counts().to_dict(), "seconds": round(time.perf_counter() - start, 2)}


def _summary(manifest: pd.DataFrame, shards: list[str], previous: dict) -> dict:
    failed = Counter(previous.get("failed_by_reason", {}))
    return previous | {"scans": len(manifest), "ok": int((manifest["status"] == "ok").sum()),
                       "failed": int((manifest["status"] == "failed").sum()), "shards": len(shards),
                       "splits": manifest["split"].value_counts().to_dict(), "failed_by_reason": dict(failed)}


# ---- repair -------------------------------------------------------------------------------------------------

def repair(out: Path, cfg: CorpusConfig | None = None, *, progress=None, ray_address: str | None = None) -> dict:
    """Rebuild what `verify` finds damaged: shards from their sources, version manifests from the shards' parts.
    Returns the verification after the repair. A damaged frozen file (norms, reference fit, ROI table) or a shard
    whose sources are gone is a one-line error."""
    out = Path(out)
    report = verify(out)
    if not report["problems"]:
        return report | {"repaired": []}
    cfg = corpus_config(out, cfg)
    versions = read_versions(out)
    manifests = {r["manifest"] for r in versions}
    for p in report["problems"]:
        if p["shard"] is None and p["path"] not in manifests:
            why = "a refit makes another corpus" if p["path"] in FROZEN else "it is not rebuilt from sources"
            raise InputError(f"{out / p['path']}: {p['problem']}; not repaired ({why}): restore it from a copy")
    record = finished_record(out)
    group = zarr.open_group(out / "timeseries.zarr", mode="r+")
    keys = group["keys"][:]
    added_by = {name: r for r in versions for name in r["shards"]}
    seed, size = int(record["seed"]), cfg.build.shard_size
    for name in report["damaged_shards"]:
        version = added_by[name]
        rows = _intact_rows(out, versions[version["version"] - 1:], report, name)
        records = {r.key: r for r in discover_all(version["sources"], cfg.source)}
        missing = [k for k in rows["key"] if k not in records]
        if missing:
            raise InputError(f"shards/{name}: its source {','.join(version['sources'])} no longer holds scan "
                             f"{missing[0]}; restore the shard from a copy")
        row0 = _first_row(rows, version["checksums"]["shards"][name], keys, size)
        shard = Shard(name, str(rows["split"].iloc[0]), row0, [records[k] for k in sorted(rows["key"])],
                      version["version"])
        for file in shard_file_names(name).values():
            (out / "shards" / file).unlink(missing_ok=True)
        for path in version["checksums"]["shards"][name]:
            if path.startswith("timeseries.zarr/"):
                (out / path).unlink(missing_ok=True)
        group["keys"][row0:row0 + size] = np.array([r.key for r in shard.records]
                                                   + [""] * (size - len(shard.records)))
        n_rois = len(read_rois(out))
        run_cfg = cfg.model_copy(update={"source": cfg.source.model_copy(
            update={"atlas": cfg.source.atlas.model_copy(update={"n_rois": n_rois})})})
        _init_ray(ray_address, run_cfg)
        with (progress or _no_bar)(f"corpus repair: {name}", 3 * len(shard.records)) as advance:
            run_passes([shard], dict(zip(rows["key"], rows["split"])), run_cfg, out, seed, advance)
    for r in versions:  # a damaged version manifest: the previous one plus its shards' parts, as the add wrote it
        if any(p["path"] == r["manifest"] for p in report["problems"]):
            _rebuild_manifest(out, versions, r)
    return verify(out) | {"repaired": report["damaged_shards"] + [p["path"] for p in report["problems"]
                                                                  if p["shard"] is None]}


def _first_row(rows: pd.DataFrame, sums: dict, keys: np.ndarray, size: int) -> int:
    """The shard's first zarr row: from its usable scans' rows, else its zarr block's path, else the keys array."""
    ok = rows.loc[rows["index"] >= 0, "index"]
    if len(ok):
        return int(ok.min()) // size * size
    block = next((p.split("/")[3] for p in sums if p.startswith("timeseries.zarr/")), None)
    if block is not None:
        return int(block) * size
    return int(np.flatnonzero(keys == sorted(rows["key"])[0])[0])


def _intact_rows(out: Path, holding: list[dict], report: dict, name: str) -> pd.DataFrame:
    """The manifest rows of shard `name` from a record that verified: a manifest of the versions that hold the shard
    (`holding`: the one that added it and those after), or else the shard's own manifest part."""
    damaged = {p["path"] for p in report["problems"]}
    for r in holding:
        if r["manifest"] not in damaged:
            manifest = pd.read_parquet(out / r["manifest"])
            return manifest[manifest["shard"] == name]
    part = f"shards/{shard_file_names(name)['manifest']}"
    if part not in damaged:
        return pd.read_parquet(out / part)
    raise InputError(f"{out / part}: damaged, and so is every manifest that lists shard {name}'s scans; restore "
                     "one of them from a copy")


def _rebuild_manifest(out: Path, versions: list[dict], record: dict) -> None:
    version_manifest(out, versions, record).to_parquet(out / record["manifest"], index=False)
