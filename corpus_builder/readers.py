"""Readers of the corpus (DESIGN 3.3): the only code besides `corpus_builder.build` that knows its layout.

    from corpus_builder.readers import shard_urls, torch_dataset, ray_dataset, open_zarr, read_captions

    ds = torch_dataset(corpus, "train", batch_size=32)            # webdataset pipeline, for a DataLoader
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                                         # a new shard and sample order per epoch
        for batch in loader: ...                                    # {"key": [B], "ts": [B, T, N], ...}

    rows = ray_dataset(corpus, "train")                             # ray.data.Dataset, one row per scan
    scans = open_zarr(corpus); x = scans["UKB-ab12cd34ef56-2-1"]    # random access by key, X [T, N]

    keys = split_keys(corpus, "train")                              # the ok scans of a split, sorted
    items = read_instructions(corpus, "train")                      # {key: qa.json items}
    pheno = read_phenotypes(corpus, "test")                         # DataFrame by key: subject, sex, age, ...
    rois = read_rois(corpus)                                        # DataFrame: index, label, network
    groups = roi_network_groups(corpus)                             # one-hot ROI -> network [N, networks]
    ref = read_reference(corpus)                                    # reference fits: networks, gradients, ICA
    norms = read_norms(corpus); manifest = read_manifest(corpus)    # norms.json as a dict; manifest.parquet

Later stages read a corpus only through these functions, never by opening its files.

A corpus is a local path or an fsspec URL (`file://`, `s3://`, `gs://`, `memory://`, ...; pass credentials and
endpoints as `storage_options`). Only completed shards (those with a `{shard}_stats.json`) are read.

Opening shards. webdataset's own opener (`gopen`) reads local paths, `file:`, `pipe:` and a few schemes through
command-line tools (curl, gsutil); it has no s3 and no fsspec, and cannot take storage options. So the tar stage
here is webdataset's `tarfile_to_samples` with its opener swapped for one that opens local paths with `open` and
every URL with `fsspec.open(url, **storage_options)`; the tar expansion and key grouping are webdataset's.

Decoded fields, the same names in the torch batches and the Ray rows (plus `key`, the sample key):
    ts        float32 [T, N] ROI time series (`ts.npy`)
    caption   str (`caption.txt`)
    desc      float32 [23] descriptor z-values in `DESCRIPTOR_NAMES` order, NaN where missing (`desc.json`)
    fc_pairs  float32 [28] network-pair FC z-values in `PAIR_NAMES` order (`desc.json`)
    qa        instruction items (`qa.json`): a list in torch, JSON text in Ray (stable Arrow schemas)
    meta      dataset, site, split, phenotypes, QC (`meta.json`): a dict in torch, JSON text in Ray
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed, pytorch_worker_info, pytorch_worker_seed

from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES, Reference
from corpus_builder.norms import load_reference
from fmrilm_core.errors import InputError

FIELDS = ("ts", "caption", "desc", "fc_pairs", "qa", "meta")
_MEMBER = {"ts": "ts.npy", "caption": "caption.txt", "desc": "desc.json", "fc_pairs": "desc.json",
           "qa": "qa.json", "meta": "meta.json"}


# ---- where the shards are -----------------------------------------------------------------------------

def _is_url(corpus: str | Path) -> bool:
    return isinstance(corpus, str) and "://" in corpus


def _filesystem(corpus: str | Path, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    if not _is_url(corpus) and storage_options:
        raise InputError(f"{corpus}: storage_options are only used with fsspec URLs (s3://..., gs://...)")
    return fsspec.core.url_to_fs(str(corpus), **(storage_options or {}))


def _list_shards(corpus: str | Path, split: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem,
                                                                                         list[str]]:
    """(filesystem, tar paths in that filesystem's own form) of the split's completed shards, sorted."""
    fs, root = _filesystem(corpus, storage_options)
    root = root.rstrip("/")
    if not fs.isdir(f"{root}/shards"):
        what = "no such corpus" if not fs.exists(root) else "not a corpus (no shards/ folder)"
        raise InputError(f"{corpus}: {what}")
    markers = fs.glob(f"{root}/shards/{split}-*_stats.json")
    tars = sorted(m[: -len("_stats.json")] + ".tar" for m in markers)
    if not tars:
        raise InputError(f"{corpus}: no completed shards of split {split!r}")
    return fs, tars


def shard_urls(corpus: str | Path, split: str, *, storage_options: dict | None = None) -> list[str]:
    """The completed tar shards of `split`, sorted: plain paths for a local corpus, URLs for a URL corpus."""
    fs, tars = _list_shards(corpus, split, storage_options)
    return tars if not _is_url(corpus) else [fs.unstrip_protocol(t) for t in tars]


READ_BUFFER = 1 << 20  # tarfile reads 10 KiB at a time: a 1 MiB file buffer makes tar iteration ~1.5x faster


def _open_stream(url: str, storage_options: dict | None):
    if url.startswith("file://"):
        url = url[len("file://"):]
    if not _is_url(url):
        return open(url, "rb", buffering=READ_BUFFER)
    return fsspec.open(url, "rb", **(storage_options or {})).open()


def _open_shards(shards: Iterable[dict], storage_options: dict | None, handler) -> Iterator[dict]:
    """{url} -> {url, stream}; a stream is closed once the next shard is asked for (the tar is read by then)."""
    for shard in shards:
        url = shard["url"]
        try:
            stream = _open_stream(url, storage_options)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        try:
            yield {**shard, "stream": stream}
        finally:
            stream.close()


def _tar_samples(shards: Iterable[dict], storage_options: dict | None = None, handler=wds.reraise_exception):
    streams = _open_shards(shards, storage_options, handler)
    return group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)


tar_samples = wds.pipelinefilter(_tar_samples)  # wds.tarfile_to_samples that opens fsspec URLs too


# ---- decoding -----------------------------------------------------------------------------------------

_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """`np.load` of .npy bytes as a read-only view, parsing each distinct header once.

    Every scan of a corpus has the same header, and parsing it (`ast.literal_eval`) costs more than the copy.
    """
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    size = 2 if data[6] == 1 else 4
    offset = 8 + size + int.from_bytes(data[8:8 + size], "little")
    header = data[:offset]
    if header not in _NPY_HEADERS:
        f = io.BytesIO(header)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else
                                 np.lib.format.read_array_header_2_0(f))
        if fortran or dtype.hasobject:
            return np.load(io.BytesIO(data), allow_pickle=False)
        _NPY_HEADERS[header] = dtype, shape
    dtype, shape = _NPY_HEADERS[header]
    count = math.prod(shape)
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f".npy member holds {len(data) - offset} bytes, its header says {count * dtype.itemsize}")
    return np.frombuffer(data, dtype, count, offset).reshape(shape)


def decode_sample(sample: dict, fields: Sequence[str] = FIELDS, json_text: bool = False) -> dict:
    """Raw tar sample -> {"key", *fields}; a missing member raises KeyError (a truncated sample is not used).

    Arrays stay numpy (read-only views; `collate` stacks them); `json_text` keeps `qa` and `meta` as JSON text.
    """
    out = {"key": sample["__key__"]}
    desc = None
    for name in fields:
        data = sample[_MEMBER[name]]
        if name == "ts":
            out[name] = load_npy(data)
        elif name == "caption":
            out[name] = data.decode("utf-8")
        elif name in ("desc", "fc_pairs"):
            desc = desc or json.loads(data)
            group, names = ("descriptors", DESCRIPTOR_NAMES) if name == "desc" else ("fc_pairs", PAIR_NAMES)
            out[name] = np.array([desc[group][n]["z"] for n in names], dtype=np.float32)
        else:
            out[name] = data.decode("utf-8") if json_text else json.loads(data)
    return out


def collate(samples: list[dict]) -> dict:
    """Arrays -> one tensor [B, ...] (the only copy of the data); anything else (keys, captions, dicts) -> a list."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) if isinstance(v, np.ndarray) else
            [s[k] for s in samples] for k, v in samples[0].items()}


# ---- the torch pipeline -------------------------------------------------------------------------------

class _Epoch:
    """The epoch number `CorpusPipeline.set_epoch` sets; DataLoader workers get it with their copy of the pipeline
    (each epoch for non-persistent workers)."""

    def __init__(self) -> None:
        self.value = 0


class _EpochShuffle(wds.PipelineStage):
    """A shuffle buffer seeded by (seed, epoch[, rank, worker]).

    Shard lists are shuffled with the same seed on every rank and worker (before they are split, so the split stays
    disjoint); samples with a seed of their own per rank and worker. Each run in the same process (a persistent
    worker, in-process iteration) also advances the epoch, so orders differ even without `set_epoch`.
    """

    def __init__(self, bufsize: int, seed: int, epoch: _Epoch, per_worker: bool) -> None:
        self.bufsize, self.seed, self.epoch, self.per_worker = bufsize, seed, epoch, per_worker
        self.runs = 0

    def run(self, src):
        epoch = self.epoch.value + self.runs
        self.runs += 1
        where = pytorch_worker_info()[::2] if self.per_worker else ()  # (rank, worker)
        rng = random.Random(make_seed(self.seed, epoch, *where))
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class _WorkerSeed:
    """ResampledShards' per-worker seed, moved on by `set_epoch`."""

    def __init__(self, epoch: _Epoch) -> None:
        self.epoch = epoch

    def __call__(self) -> int:
        return make_seed(pytorch_worker_seed(), self.epoch.value)


class CorpusPipeline(wds.DataPipeline):
    """A webdataset pipeline with `set_epoch`, to be called before each epoch (as with a DistributedSampler)."""

    def __init__(self, *stages, epoch: _Epoch) -> None:
        super().__init__(*stages)
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = epoch


def torch_dataset(corpus: str | Path, split: str, *, batch_size: int, shuffle: int = 1000, resampled: bool = False,
                  epoch_samples: int | None = None, seed: int = 0, decode_fields: Sequence[str] = ("ts", "caption",
                                                                                                  "desc"),
                  storage_options: dict | None = None) -> CorpusPipeline:
    """Batches {"key": [B] str, "ts": [B, T, N] float32, "caption": [B] str, "desc": [B, 23] float32, ...}.

    Use with `DataLoader(ds, batch_size=None, num_workers=...)` (or `wds.WebLoader`). Without resampling every
    sample of the split comes once per epoch: shards are split between ranks (`torch.distributed` or RANK /
    WORLD_SIZE) and then between DataLoader workers, so with more ranks x workers than shards some get nothing.
    With `resampled=True` every worker draws shards with replacement forever (no split: its seed depends on rank
    and worker); give `epoch_samples` then. `epoch_samples` is the number of samples per worker per epoch, in whole
    batches (rounded up), drawn from a repeating stream: multi-node training gets equal epochs on every rank.
    `shuffle` is the sample shuffle buffer (0 = file order, shards unshuffled). A shard that cannot be opened or
    read (truncated, corrupt) and a sample missing a member are skipped with a warning.
    """
    unknown = [f for f in decode_fields if f not in FIELDS]
    if unknown:
        raise InputError(f"decode_fields: unknown {unknown}; choose from {list(FIELDS)}")
    if batch_size < 1:
        raise InputError(f"batch_size: must be >= 1, got {batch_size}")
    urls = shard_urls(corpus, split, storage_options=storage_options)
    epoch = _Epoch()
    if resampled:
        shards = [wds.ResampledShards(urls, seed=seed, worker_seed=_WorkerSeed(epoch), deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls),
                  _EpochShuffle(len(urls), seed, epoch, per_worker=False) if shuffle else None,
                  wds.split_by_node,
                  wds.split_by_worker]
    pipeline = CorpusPipeline(
        *shards,
        tar_samples(storage_options=storage_options, handler=wds.warn_and_continue),
        wds.map(partial(decode_sample, fields=tuple(decode_fields)), handler=wds.warn_and_continue),
        _EpochShuffle(shuffle, seed, epoch, per_worker=True) if shuffle else None,
        wds.batched(batch_size, collation_fn=collate, partial=not resampled),
        epoch=epoch,
    )
    if epoch_samples:
        pipeline = pipeline.with_epoch(nbatches=math.ceil(epoch_samples / batch_size))  # counts batches
    return pipeline


def read_captions(corpus: str | Path, split: str, *, storage_options: dict | None = None) -> dict[str, str]:
    """{key: caption} of every sample of the split, read in one pass over its shards (errors raise here)."""
    shards = ({"url": u} for u in shard_urls(corpus, split, storage_options=storage_options))
    return {s["__key__"]: s["caption.txt"].decode("utf-8") for s in _tar_samples(shards, storage_options)}


def _read_members(corpus: str | Path, split: str, member: str, storage_options: dict | None) -> dict[str, bytes]:
    """{key: raw bytes of `member`} of every sample of the split, one pass over its shards (errors raise here)."""
    shards = ({"url": u} for u in shard_urls(corpus, split, storage_options=storage_options))
    return {s["__key__"]: s[member] for s in _tar_samples(shards, storage_options)}


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


# ---- Ray Data -----------------------------------------------------------------------------------------

def _ray_row(sample: dict) -> dict:
    return decode_sample(sample, FIELDS, json_text=True)


def ray_dataset(corpus: str | Path, split: str, *, storage_options: dict | None = None, **read_args):
    """The split as a `ray.data.Dataset`, one row per scan: key, ts [T, N] float32, caption, desc [23],
    fc_pairs [28], qa and meta (JSON text). `read_args` go to `ray.data.read_webdataset` (concurrency, ...)."""
    import ray.data

    fs, tars = _list_shards(corpus, split, storage_options)
    filesystem = fs if _is_url(corpus) else None  # Ray wraps an fsspec filesystem for its pyarrow readers
    return ray.data.read_webdataset(tars, filesystem=filesystem, decoder=_ray_row, **read_args)


# ---- the corpus's tables: manifest, ROIs, reference fits, norms ----------------------------------------

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
    """`manifest.parquet`: one row per scan (key, dataset, subject, session, run, split, status, error, index,
    ...), failed scans included."""
    fs, path = _corpus_file(corpus, "manifest.parquet", storage_options)
    with fs.open(path, "rb") as f:
        return pd.read_parquet(f)


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


# ---- zarr random access -------------------------------------------------------------------------------

class ZarrCorpus:
    """The corpus' zarr arrays read by scan key: `corpus[key]` -> X [T, N] float32 (the array in the tar).

    `manifest` is the whole manifest (failed scans included); `keys()` the ok scans in manifest order.
    """

    def __init__(self, corpus: str | Path, *, storage_options: dict | None = None) -> None:
        import zarr

        fs, root = _filesystem(corpus, storage_options)
        root = root.rstrip("/")
        self.manifest = read_manifest(corpus, storage_options=storage_options)
        self.corpus = str(corpus)
        norms = read_norms(corpus, storage_options=storage_options)
        store = fs.unstrip_protocol(f"{root}/timeseries.zarr") if _is_url(corpus) else f"{root}/timeseries.zarr"
        group = zarr.open_group(store, mode="r", storage_options=storage_options if _is_url(corpus) else None)
        self._ts, self._desc, self._pairs = group["ts"], group["descriptors"], group["fc_pairs"]
        ok = self.manifest[self.manifest["status"] == "ok"]
        self._row = dict(zip(ok["key"], ok["index"].astype(int)))
        stored = group["keys"][:]
        if any(stored[row] != key for key, row in self._row.items()):
            raise InputError(f"{corpus}: manifest.parquet and timeseries.zarr disagree on which row holds a scan")
        self._norms = {name: np.array([norms["mean"].get(n, np.nan) for n in names], np.float64)
                       for name, names in (("desc", DESCRIPTOR_NAMES), ("pairs", PAIR_NAMES))}
        self._stds = {name: np.array([norms["std"].get(n, np.nan) for n in names], np.float64)
                      for name, names in (("desc", DESCRIPTOR_NAMES), ("pairs", PAIR_NAMES))}

    def keys(self) -> list[str]:
        return list(self._row)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(ok scans, T, N)."""
        return (len(self._row), *self._ts.shape[1:])

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def __iter__(self) -> Iterator[str]:
        return iter(self._row)

    def _index(self, key: str) -> int:
        if key in self._row:
            return self._row[key]
        failed = self.manifest.loc[self.manifest["key"] == key, "error"]
        raise KeyError(f"{key}: failed in the build ({failed.iloc[0]})" if len(failed) else
                       f"{key}: no such scan in {self.corpus}")

    def __getitem__(self, key: str) -> np.ndarray:
        return self._ts[self._index(key)]

    def batch(self, keys: Sequence[str]) -> np.ndarray:
        """X of several scans at once, [B, T, N] in the order of `keys` (one zarr read)."""
        return self._ts.get_orthogonal_selection(np.array([self._index(k) for k in keys], dtype=np.int64))

    def _vector(self, array, name: str, key: str, z: bool) -> np.ndarray:
        values = array[self._index(key)].astype(np.float64)
        if not z:
            return values
        mean, std = self._norms[name], self._stds[name]
        with np.errstate(invalid="ignore", divide="ignore"):
            usable = np.isfinite(values) & np.isfinite(std) & (std > 0)
            return np.where(usable, (values - mean) / np.where(usable, std, 1.0), np.nan)

    def descriptors(self, key: str, *, z: bool = False) -> np.ndarray:
        """The 23 descriptors in `DESCRIPTOR_NAMES` order (raw values, or z against the corpus norms as in the
        tar's `desc.json`), float64, NaN where missing."""
        return self._vector(self._desc, "desc", key, z)

    def fc_pairs(self, key: str, *, z: bool = False) -> np.ndarray:
        """The 28 network-pair FC values in `PAIR_NAMES` order (raw or z), float64."""
        return self._vector(self._pairs, "pairs", key, z)


def open_zarr(corpus: str | Path, *, storage_options: dict | None = None) -> ZarrCorpus:
    return ZarrCorpus(corpus, storage_options=storage_options)
