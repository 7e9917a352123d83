"""A corpus's tar shards: where they are (a local path or an fsspec URL), how they are opened and decoded.

The layer under the readers of `corpus_builder.readers` (the torch pipeline, Ray Data) and of
`corpus_builder.metadata` (captions, instruction items, phenotypes); later stages use those, never this module.

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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES
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
    committed = _committed_shards(fs, root)
    if committed is not None:  # a finished corpus: its current version's shards, not those an add is staging
        tars = [t for t in tars if t.rsplit("/", 1)[-1].removesuffix(".tar") in committed]
    if not tars:
        raise InputError(f"{corpus}: no completed shards of split {split!r}")
    return fs, tars


def _committed_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[str] | None:
    """The shards complete.json names (the corpus's current version), or None for a corpus still building."""
    try:
        with fs.open(f"{root}/complete.json", "rb") as f:
            names = json.loads(f.read()).get("shards")
    except FileNotFoundError:
        return None
    return set(names) if names is not None else None


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


def _read_members(corpus: str | Path, split: str, member: str, storage_options: dict | None) -> dict[str, bytes]:
    """{key: raw bytes of `member`} of every sample of the split, one pass over its shards (errors raise here)."""
    shards = ({"url": u} for u in shard_urls(corpus, split, storage_options=storage_options))
    return {s["__key__"]: s[member] for s in _tar_samples(shards, storage_options)}
