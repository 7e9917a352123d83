"""Readers of the corpus (docs/design.md): with `tar_reader` and `metadata`, the only code besides the build that knows
its layout.

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

The tar shards are listed, opened (local paths and fsspec URLs) and decoded in `corpus_builder.tar_reader` (the
decoded fields are listed there); captions, instruction items, phenotypes and the corpus's root files are read in
`corpus_builder.metadata`. Every public name of both is importable from here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.utils import make_seed, pytorch_worker_info, pytorch_worker_seed

from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES
from corpus_builder.metadata import (  # noqa: F401  (importable from here as before)
    PHENOTYPE_COLUMNS,
    read_captions,
    read_corpus_file,
    read_instructions,
    read_manifest,
    read_norms,
    read_phenotypes,
    read_reference,
    read_rois,
    roi_network_groups,
    split_keys,
)
from corpus_builder.tar_reader import (  # noqa: F401  (importable from here as before)
    FIELDS,
    READ_BUFFER,
    _filesystem,
    _is_url,
    _list_shards,
    collate,
    decode_sample,
    load_npy,
    shard_urls,
    tar_samples,
)
from fmrilm_core.errors import InputError

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
