"""The corpus readers: webdataset for torch, Ray Data, zarr by key, the corpus's tables (manifest, split keys,
ROIs and networks, reference fits, norms); local paths and fsspec URLs."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import ray
import torch
import webdataset as wds

from corpus_builder.build import build_corpus
from corpus_builder.config import DescriptorConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES
from corpus_builder.norms import Norms, load_reference
from corpus_builder.readers import (
    open_zarr,
    ray_dataset,
    read_captions,
    read_manifest,
    read_norms,
    read_reference,
    read_rois,
    roi_network_groups,
    shard_urls,
    split_keys,
    torch_dataset,
)
from corpus_builder.synth import synthesize
from fmrilm.config import load_config
from fmrilm_core.errors import InputError

T, N = 32, 450


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """10 scans (one unreadable, so failed) in shards of 3: 3 train shards, 1 val, no test."""
    tmp = tmp_path_factory.mktemp("readers")
    cfg = load_config(None, ["synth.subjects=10", "synth.length_scale=0.3", f"corpus.source.cleaning.length={T}",
                             "corpus.build.shard_size=3", "corpus.build.workers=2"])
    synthesize(cfg.synth, tmp / "cohort")
    sorted((tmp / "cohort").glob("sub-*/**/*_timeseries.npy"))[0].write_bytes(b"not an array")
    build_corpus([str(tmp / "cohort")], cfg.corpus, tmp / "corpus")
    yield tmp / "corpus"
    ray.shutdown()


def ok_keys(corpus: Path, split: str | None = None) -> list[str]:
    m = pd.read_parquet(corpus / "manifest.parquet")
    m = m[m["status"] == "ok"]
    return sorted(m["key"] if split is None else m.loc[m["split"] == split, "key"])


def keys_of(batches) -> Counter:
    return Counter(k for batch in batches for k in batch["key"])


def test_fixture_has_a_failed_scan_and_no_test_split(corpus):
    m = pd.read_parquet(corpus / "manifest.parquet")
    assert (m["status"] == "failed").sum() == 1 and (m.loc[m["status"] == "failed", "index"] == -1).all()
    assert set(m["split"]) == {"train", "val"}


def test_plain_webdataset_reads_every_ok_key_once(corpus):
    urls = shard_urls(corpus, "train") + shard_urls(corpus, "val")
    keys = Counter(s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert sorted(keys) == ok_keys(corpus) and set(keys.values()) == {1}


def test_shard_urls_only_completed_shards_sorted(corpus, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(corpus / "shards", copy / "shards")
    (copy / "shards" / "train-000001_stats.json").unlink()  # as if its writer had been killed
    assert [Path(u).name for u in shard_urls(copy, "train")] == ["train-000000.tar", "train-000002.tar"]


def test_torch_dataset_through_dataloader_yields_each_sample_once_per_epoch(corpus):
    ds = torch_dataset(corpus, "train", batch_size=2, shuffle=4, decode_fields=("ts", "caption", "desc", "meta"))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    orders = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        batches = list(loader)
        keys = keys_of(batches)
        assert sorted(keys) == ok_keys(corpus, "train") and set(keys.values()) == {1}
        orders.append([k for b in batches for k in b["key"]])
        for b in batches:
            n = len(b["key"])
            assert 1 <= n <= 2 and b["ts"].shape == (n, T, N) and b["ts"].dtype == torch.float32
            assert b["desc"].shape == (n, len(DESCRIPTOR_NAMES)) and b["desc"].dtype == torch.float32
            assert all(isinstance(c, str) and c for c in b["caption"])
            assert [m["split"] for m in b["meta"]] == ["train"] * n
    assert orders[0] != orders[1]  # set_epoch reshuffles shards and samples


def test_shuffle_order_is_a_function_of_seed_and_epoch(corpus):
    def order(seed, epoch):
        ds = torch_dataset(corpus, "train", batch_size=3, shuffle=5, seed=seed)
        ds.set_epoch(epoch)
        return [k for b in ds for k in b["key"]]

    assert order(0, 1) == order(0, 1) and sorted(order(0, 1)) == ok_keys(corpus, "train")
    assert len({tuple(order(seed, epoch)) for seed in (0, 1) for epoch in (0, 1)}) > 1


def test_resampled_epoch_has_a_fixed_number_of_samples_per_worker(corpus):
    ds = torch_dataset(corpus, "train", batch_size=2, shuffle=0, resampled=True, epoch_samples=4)
    assert sum(len(b["key"]) for b in ds) == 4  # in-process: one worker
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for _ in range(2):
        batches = list(loader)
        assert [len(b["key"]) for b in batches] == [2] * 4  # 2 workers x 4 samples
        assert set(keys_of(batches)) <= set(ok_keys(corpus, "train"))


def test_ray_dataset_counts_ok_scans_and_decodes_rows(corpus):
    ds = ray_dataset(corpus, "train")
    assert ds.count() == len(ok_keys(corpus, "train"))
    row = ds.take(1)[0]
    assert set(row) == {"key", "ts", "caption", "desc", "fc_pairs", "qa", "meta"}
    assert row["ts"].shape == (T, N) and row["ts"].dtype == np.float32
    assert row["desc"].shape == (23,) and row["fc_pairs"].shape == (28,)
    assert isinstance(row["caption"], str) and row["key"] in ok_keys(corpus, "train")


def test_zarr_corpus_returns_the_arrays_stored_in_the_tars(corpus):
    scans = open_zarr(corpus)
    assert sorted(scans.keys()) == ok_keys(corpus) and len(scans) == len(ok_keys(corpus))
    fields = ("ts", "desc", "fc_pairs")
    for split in ("train", "val"):
        for batch in torch_dataset(corpus, split, batch_size=4, shuffle=0, decode_fields=fields):
            for i, key in enumerate(batch["key"]):
                assert np.array_equal(scans[key], batch["ts"][i].numpy())
                assert np.array_equal(scans.descriptors(key, z=True).astype(np.float32), batch["desc"][i].numpy(),
                                      equal_nan=True)
                assert np.array_equal(scans.fc_pairs(key, z=True).astype(np.float32), batch["fc_pairs"][i].numpy(),
                                      equal_nan=True)
    assert scans.shape == (len(ok_keys(corpus)), T, N)
    captions = read_captions(corpus, "train")
    assert sorted(captions) == ok_keys(corpus, "train")
    for batch in torch_dataset(corpus, "train", batch_size=4, shuffle=0, decode_fields=("caption",)):
        assert [captions[k] for k in batch["key"]] == batch["caption"]
    keys = scans.keys()[:3][::-1]
    assert np.array_equal(scans.batch(keys), np.stack([scans[k] for k in keys]))
    failed = pd.read_parquet(corpus / "manifest.parquet").query("status == 'failed'")["key"].iloc[0]
    assert failed not in scans
    with pytest.raises(KeyError, match="failed in the build"):
        scans[failed]
    with pytest.raises(KeyError, match="no such scan"):
        scans["UKB-000000000000-1-1"]


def test_truncated_or_missing_shard_is_skipped_with_a_warning(corpus, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(corpus / "shards", copy / "shards")
    whole = (copy / "shards" / "train-000000.tar").read_bytes()
    (copy / "shards" / "train-000099.tar").write_bytes(whole[:3000])  # cut inside the first sample's ts.npy
    (copy / "shards" / "train-000099_stats.json").write_text("{}")
    (copy / "shards" / "train-000098_stats.json").write_text("{}")  # its tar is gone
    ds = torch_dataset(copy, "train", batch_size=3, shuffle=0)
    with pytest.warns(UserWarning):
        keys = keys_of(ds)
    assert sorted(keys) == ok_keys(corpus, "train") and set(keys.values()) == {1}


def test_file_and_memory_urls(corpus):
    url = f"file://{corpus}"
    assert all(u.startswith("file://") for u in shard_urls(url, "train"))
    assert sorted(keys_of(torch_dataset(url, "val", batch_size=8))) == ok_keys(corpus, "val")
    fs = fsspec.filesystem("memory")
    fs.put(str(corpus), "/readers-test", recursive=True)
    try:
        mem = "memory://readers-test"
        assert sorted(keys_of(torch_dataset(mem, "train", batch_size=8))) == ok_keys(corpus, "train")
        local, remote = open_zarr(corpus), open_zarr(mem)
        key = local.keys()[0]
        assert np.array_equal(remote[key], local[key]) and np.array_equal(open_zarr(url)[key], local[key])
    finally:
        fs.rm("/readers-test", recursive=True)


def test_missing_corpus_and_empty_split_are_input_errors(corpus, tmp_path):
    with pytest.raises(InputError, match="no such corpus"):
        shard_urls(tmp_path / "nowhere", "train")
    with pytest.raises(InputError, match="no completed shards of split 'test'"):
        torch_dataset(corpus, "test", batch_size=2)
    with pytest.raises(InputError, match="not a corpus"):
        ray_dataset(tmp_path, "train")
    with pytest.raises(InputError, match="no such corpus"):
        open_zarr(f"file://{tmp_path}/nowhere")


@pytest.fixture
def memory_copy(corpus):
    """The corpus copied into fsspec's in-memory filesystem: its memory:// URL."""
    fs = fsspec.filesystem("memory")
    fs.put(str(corpus), "/readers-tables", recursive=True)
    yield "memory://readers-tables"
    fs.rm("/readers-tables", recursive=True)


def test_read_manifest_and_split_keys(corpus, memory_copy):
    manifest = read_manifest(corpus)
    pd.testing.assert_frame_equal(manifest, pd.read_parquet(corpus / "manifest.parquet"))
    for split in ("train", "val"):
        assert split_keys(corpus, split) == ok_keys(corpus, split) and ok_keys(corpus, split)
    failed = manifest.loc[manifest["status"] == "failed", "key"].iloc[0]
    assert failed not in split_keys(corpus, "train") + split_keys(corpus, "val")  # ok scans only
    assert split_keys(corpus, "test") == []  # the fixture has no test split
    assert split_keys(memory_copy, "train") == split_keys(f"file://{corpus}", "train") == ok_keys(corpus, "train")
    pd.testing.assert_frame_equal(read_manifest(memory_copy), manifest)


def test_read_rois_and_network_groups(corpus, memory_copy, tmp_path):
    rois = read_rois(corpus)
    assert list(rois.columns) == ["index", "label", "network"] and len(rois) == N
    assert rois["network"].notna().all()
    pd.testing.assert_frame_equal(read_rois(memory_copy), rois)
    groups = roi_network_groups(corpus)
    networks = sorted(rois["network"].astype(str).unique())
    assert groups.shape == (N, len(networks)) and groups.dtype == np.float32 and (groups.sum(1) == 1).all()
    for i, network in enumerate(networks):  # columns in sorted network order
        assert np.array_equal(groups[:, i] == 1, (rois["network"].astype(str) == network).to_numpy())
    assert np.array_equal(roi_network_groups(memory_copy), groups)
    assert roi_network_groups(tmp_path / "nowhere") is None  # no ROI table: no groups
    partial = rois.copy()
    partial.loc[3, "network"] = None  # one ROI without a network: no groups either
    partial.to_csv(tmp_path / "rois.tsv", sep="\t", index=False)
    assert roi_network_groups(tmp_path) is None
    with pytest.raises(InputError, match="no rois.tsv"):
        read_rois(corpus / "shards")  # a folder, but no corpus root


def test_read_reference_and_norms(corpus, memory_copy):
    cfg = DescriptorConfig(gradient_components=5)
    expected = load_reference(corpus / "reference.npz", cfg)
    for where in (corpus, str(corpus), f"file://{corpus}", memory_copy):
        ref = read_reference(where, cfg)
        assert ref.config == cfg
        assert np.array_equal(ref.networks, expected.networks) and np.array_equal(ref.gradients, expected.gradients)
        assert np.array_equal(ref.ica_maps, expected.ica_maps)
    assert read_reference(corpus).config == DescriptorConfig()
    assert ref.gradients.shape[0] == N and len(ref.networks) == N
    norms = read_norms(corpus)
    saved = Norms.load(corpus / "norms.json")
    assert (norms["cohort"], norms["count"]) == (saved.cohort, saved.count) and norms["cohort"].endswith("/train")
    assert set(DESCRIPTOR_NAMES) <= set(norms["mean"]) and set(DESCRIPTOR_NAMES) <= set(norms["std"])
    as_text = json.dumps(norms, sort_keys=True)  # compared as text: NaN never equals NaN
    assert as_text == json.dumps(json.loads((corpus / "norms.json").read_text()), sort_keys=True)
    assert json.dumps(read_norms(memory_copy), sort_keys=True) == as_text


def test_corpus_tables_missing_are_input_errors(corpus, tmp_path):
    for read in (read_manifest, read_rois, read_reference, read_norms):
        with pytest.raises(InputError, match="no such corpus"):
            read(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="no reference.npz"):
        read_reference(tmp_path / "half")
    with pytest.raises(InputError, match="no manifest.parquet"):
        split_keys(tmp_path / "half", "train")
    with pytest.raises(InputError, match="storage_options are only used with fsspec URLs"):
        read_rois(corpus, storage_options={"anon": True})
