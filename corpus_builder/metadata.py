"""What a corpus says besides its series: per-scan captions, instruction items and phenotypes (each one pass
over a split's shards), and the files at its root (manifest, split keys, ROI table and networks, reference fits,
norms). All are importable from `corpus_builder.readers`, the corpus's front door.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd

from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors import Reference
from corpus_builder.norms import load_reference
from corpus_builder.tar_reader import _filesystem, _is_url, _read_members, _tar_samples, shard_urls
from fmrilm_core.errors import InputError

# ---- per-scan members of a split ----------------------------------------------------------------------

def read_captions(corpus: str | Path, split: str, *, storage_options: dict | None = None) -> dict[str, str]:
    """{key: caption} of every sample of the split, read in one pass over its shards (errors raise here)."""
    shards = ({"url": u} for u in shard_urls(corpus, split, storage_options=storage_options))
    return {s["__key__"]: s["caption.txt"].decode("utf-8") for s in _tar_samples(shards, storage_options)}


def read_instructions(corpus: str | Path, split: str, *, storage_options: dict | None = None) -> dict[str, list]:
    """{key: instruction items} (`qa.json`, schema in `corpus_builder.instructions`) of every sample of the split."""
    return {k: json.loads(v) for k, v in _read_members(corpus, split, "qa.json", storage_options).items()}


PHENOTYPE_COLUMNS = ("sex", "age", "fluid_intelligence", "diagnosis")


def read_phenotypes(corpus: str | Path, split: str, *, storage_options: dict | None = None) -> pd.DataFrame:
    """One row per scan of the split, indexed by key (sorted): dataset, subject (the pseudonym: subject-level checks
    group by it), site, split, and the phenotypes of `meta.json` (sex as written, age and fluid intelligence as
    floats, diagnosis as written; NaN / None where the scan has none)."""
    metas = {k: json.loads(v) for k, v in _read_members(corpus, split, "meta.json", storage_options).items()}
    manifest = read_manifest(corpus, storage_options=storage_options).set_index("key")
    rows = []
    for key in sorted(metas):
        meta = metas[key]
        pheno = meta.get("phenotypes") or {}
        row = {"key": key, "dataset": meta.get("dataset"),
               "subject": manifest.at[key, "subject"] if key in manifest.index else None,
               "site": meta.get("site"), "split": meta.get("split", split)}
        for name in PHENOTYPE_COLUMNS:
            value = pheno.get(name)
            if name in ("age", "fluid_intelligence"):
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    value = float("nan")
            row[name] = value
        rows.append(row)
    columns = ["key", "dataset", "subject", "site", "split", *PHENOTYPE_COLUMNS]
    return pd.DataFrame(rows, columns=columns).set_index("key")


# ---- the corpus's tables: manifest, ROIs, reference fits, norms ---------------------------------------

def _corpus_file(corpus: str | Path, name: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem,
                                                                                     str]:
    """(filesystem, path) of the file `name` at the corpus root; a missing corpus or file is an InputError."""
    fs, root = _filesystem(corpus, storage_options)
    root = root.rstrip("/")
    path = f"{root}/{name}"
    if not fs.isfile(path):
        raise InputError(f"{corpus}: {'no such corpus' if not fs.exists(root) else f'no {name}'}")
    return fs, path


def read_corpus_file(corpus: str | Path, name: str, *, storage_options: dict | None = None) -> bytes:
    """The bytes of a file at the corpus root (`norms.json`, `complete.json`, ...); InputError when missing."""
    fs, path = _corpus_file(corpus, name, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def read_manifest(corpus: str | Path, *, storage_options: dict | None = None) -> pd.DataFrame:
    """The manifest of the corpus's current version (`manifest.parquet` until an add; complete.json names it): one
    row per scan (key, dataset, subject, session, run, split, status, error, index, version, ...), failed scans
    included. `version` is the corpus version that added the scan (1 in a corpus built before versions)."""
    name = "manifest.parquet"
    fs, root = _filesystem(corpus, storage_options)
    try:
        with fs.open(f"{root.rstrip('/')}/complete.json", "rb") as f:
            name = json.loads(f.read()).get("manifest", name)
    except FileNotFoundError:
        pass
    fs, path = _corpus_file(corpus, name, storage_options)
    with fs.open(path, "rb") as f:
        manifest = pd.read_parquet(f)
    if "version" not in manifest:
        manifest["version"] = 1
    return manifest


def split_keys(corpus: str | Path, split: str, *, storage_options: dict | None = None) -> list[str]:
    """The keys of the split's usable (status ok) scans, sorted; empty when the split has none."""
    manifest = read_manifest(corpus, storage_options=storage_options)
    return sorted(manifest.loc[(manifest["status"] == "ok") & (manifest["split"] == split), "key"])


def read_rois(corpus: str | Path, *, storage_options: dict | None = None) -> pd.DataFrame:
    """`rois.tsv`, one row per ROI in atlas order (the N axis of every X [T, N]): index, label, network."""
    fs, path = _corpus_file(corpus, "rois.tsv", storage_options)
    with fs.open(path, "rb") as f:
        return pd.read_csv(f, sep="\t")


def roi_network_groups(corpus: str | Path, *, storage_options: dict | None = None) -> np.ndarray | None:
    """One-hot ROI -> network membership [N, networks] (networks in sorted order) from the corpus's ROI table;
    None when the corpus has no ROI table or some ROI has no network."""
    fs, root = _filesystem(corpus, storage_options)
    if not fs.isfile(f"{root.rstrip('/')}/rois.tsv"):
        return None
    networks = read_rois(corpus, storage_options=storage_options)
    if "network" not in networks or networks["network"].isna().any():
        return None
    labels = networks["network"].astype(str).to_numpy()
    return (labels[:, None] == np.unique(labels)[None, :]).astype(np.float32)


def read_reference(corpus: str | Path, cfg: DescriptorConfig | None = None, *,
                   storage_options: dict | None = None) -> Reference:
    """The reference-cohort fits of `reference.npz` (ROI networks, reference gradients, group-ICA maps), with the
    descriptor settings `cfg` (None: the defaults; `corpus_builder.norms.load_reference`). A URL corpus's file is
    copied to a temporary file first (numpy reads local files)."""
    cfg = cfg if cfg is not None else DescriptorConfig()
    fs, path = _corpus_file(corpus, "reference.npz", storage_options)
    if not _is_url(corpus):
        return load_reference(Path(path), cfg)
    with tempfile.TemporaryDirectory(prefix="fmrilm-reference-") as tmp:
        local = Path(tmp) / "reference.npz"
        fs.get_file(path, str(local))
        return load_reference(local, cfg)  # the arrays are in memory once it returns


def read_norms(corpus: str | Path, *, storage_options: dict | None = None) -> dict:
    """`norms.json`: the reference cohort's name and count, and the mean / std of every descriptor and network
    pair ({"cohort", "count", "mean": {name: value}, "std": {name: value}})."""
    fs, path = _corpus_file(corpus, "norms.json", storage_options)
    with fs.open(path, "rb") as f:
        return json.load(f)
