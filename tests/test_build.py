"""Corpus build (`corpus_builder.build`, docs/design.md): the on-disk contract read back with stock readers, bad
scans as failed rows, kill -9 and resume, byte-identical rebuilds, subject-level splits, refusals, and a build
on a 2-node local Ray cluster.

One local Ray instance serves the module (`build_corpus` reuses an initialised Ray); the resume test builds in
a subprocess with its own Ray, the cluster test swaps the module's Ray for a cluster and back.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import webdataset as wds
import zarr

from corpus_builder.build import build_corpus, finished_build
from corpus_builder.config import SynthConfig
from corpus_builder.extraction import discover_all
from corpus_builder.synth import synthesize
from fmrilm.config import load_config
from fmrilm_core.errors import InputError

REPO = Path(__file__).parents[1]
# 8 subjects x 2 sessions, T = 64, 2 scans per shard: ~9 shards over the three splits
OVERRIDES = ["corpus.source.cleaning.length=64", "corpus.build.shard_size=2", "corpus.build.workers=2",
             "corpus.splits.fractions=[0.6,0.2,0.2]"]
MEMBERS = {"ts.npy", "desc.json", "caption.txt", "qa.json", "meta.json"}


def corpus_config(*extra: str):
    return load_config(None, OVERRIDES + list(extra)).corpus


def _start_local_ray() -> None:
    # address="local": never attach to another cluster recorded in /tmp/ray/ray_current_cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    _start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build") / "cohort"
    synthesize(SynthConfig(subjects=8, sessions=2, length_scale=0.4, datasets=["UKB", "ABCD"]), root)
    return root


@pytest.fixture(scope="module")
def corpus(cohort) -> tuple[Path, dict]:
    """The reference build every other build of the same inputs is compared with."""
    out = cohort.parent / "corpus"
    return out, build_corpus([str(cohort)], corpus_config(), out)


# ---- helpers ------------------------------------------------------------------------------------------

def read_tars(out: Path) -> dict[str, list[dict]]:
    """Samples of every tar with plain webdataset: {tar stem: [sample, ...]} (members still bytes)."""
    return {tar.name.removesuffix(".tar"): list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))
            for tar in sorted((out / "shards").glob("*.tar"))}


def manifest_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def assert_same_corpus(a: Path, b: Path) -> None:
    """Byte-identical tars and manifests; equal zarr arrays, norms and ROI table."""
    tars_a = sorted(p.name for p in (a / "shards").glob("*.tar"))
    assert tars_a and tars_a == sorted(p.name for p in (b / "shards").glob("*.tar"))
    for name in tars_a:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    for name in ["manifest.parquet", *(f"shards/{t.removesuffix('.tar')}_manifest.parquet" for t in tars_a),
                 "norms.json", "rois.tsv"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    za, zb = zarr.open_group(a / "timeseries.zarr", mode="r"), zarr.open_group(b / "timeseries.zarr", mode="r")
    for name in ("ts", "descriptors", "fc_pairs", "keys"):
        np.testing.assert_array_equal(za[name][:], zb[name][:], err_msg=name)


def assert_complete(out: Path, keys: set[str]) -> None:
    """Every discovered scan is one manifest row; every ok scan sits in exactly one tar; nothing half-written."""
    manifest = manifest_of(out)
    assert manifest["key"].is_unique and set(manifest["key"]) == keys
    in_tars = Counter(s["__key__"] for samples in read_tars(out).values() for s in samples)
    assert set(in_tars.values()) == {1}
    assert set(in_tars) == set(manifest.loc[manifest["status"] == "ok", "key"])
    assert not list((out / "shards").glob("*.part"))


# ---- the corpus a user reads --------------------------------------------------------------------------

def test_corpus_reads_back_with_stock_readers(cohort, corpus):
    out, summary = corpus
    discovered = discover_all([str(cohort)], corpus_config().source)
    manifest = manifest_of(out)
    assert len(manifest) == len(discovered) == summary["scans"] == 16
    assert summary["ok"] + summary["failed"] == len(manifest) == (manifest["status"].isin(["ok", "failed"])).sum()
    assert set(manifest["key"]) == {r.key for r in discovered}
    assert_complete(out, {r.key for r in discovered})

    ok = manifest[manifest["status"] == "ok"].set_index("key")
    group = zarr.open_group(out / "timeseries.zarr", mode="r")
    ts = zarr.open(out / "timeseries.zarr" / "ts", mode="r")
    assert ts.shape[1:] == (64, 450) and ts.dtype == np.float32
    names = group["descriptors"].attrs["names"]
    for tar, samples in read_tars(out).items():
        for sample in samples:
            key = sample["__key__"]
            assert MEMBERS <= set(sample), key
            assert ok.loc[key, "shard"] == tar and tar.startswith(ok.loc[key, "split"])
            row = int(ok.loc[key, "index"])
            x = np.load(io.BytesIO(sample["ts.npy"]), allow_pickle=False)
            np.testing.assert_array_equal(x, ts[row])
            assert group["keys"][row] == key
            desc = json.loads(sample["desc.json"])
            assert len(desc["descriptors"]) == 23 and set(names) == set(desc["descriptors"])
            np.testing.assert_array_equal(group["descriptors"][row],
                                          np.array([desc["descriptors"][n]["value"] for n in names], np.float32))
            assert sample["caption.txt"].decode().strip()
            assert json.loads(sample["meta.json"])["split"] == ok.loc[key, "split"]

    rows = ray.data.read_webdataset(sorted(str(p) for p in (out / "shards").glob("*.tar"))).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(ok.index)
    for r in rows:
        np.testing.assert_array_equal(r["ts.npy"], ts[int(ok.loc[r["__key__"], "index"])])
        assert set(r["desc.json"]["descriptors"]) == set(names)


@pytest.fixture(scope="module")
def bad_corpus(cohort) -> tuple[Path, Path, dict]:
    """The cohort with a corrupt .npy, a sidecar without RepetitionTime and a subject missing from
    participants.tsv, built with one shard per split, so bad and good scans share shards."""
    source = cohort.parent / "bad-cohort"
    shutil.copytree(cohort, source)
    series = sorted(source.glob("sub-*/*/func/*_timeseries.npy"))
    series[0].write_bytes(b"\x93NUMPY this is not an array")
    series[5].with_suffix(".json").write_text(json.dumps({"Atlas": "TianS3Schaefer400"}))
    donor, stray = series[9].parents[2].name, source / "sub-7654321" / "ses-1" / "func"
    stray.mkdir(parents=True)
    for path in series[9].parent.glob(f"{donor}_*"):  # one scan: series, sidecar, confounds
        shutil.copy(path, stray / path.name.replace(donor, "sub-7654321"))
    out = cohort.parent / "bad-corpus"
    return source, out, build_corpus([str(source)], corpus_config("corpus.build.shard_size=64"), out)


def test_bad_scans_are_failed_rows_and_the_rest_of_the_shard_is_written(bad_corpus):
    source, out, summary = bad_corpus
    manifest = manifest_of(out)
    assert len(manifest) == 17 and summary["scans"] == 17 and summary["ok"] == 14 and summary["failed"] == 3
    assert sum(summary["failed_by_reason"].values()) == 3
    failed = manifest[manifest["status"] == "failed"]
    errors = sorted(failed["error"])
    assert [any(word in e for e in errors) for word in ("RepetitionTime", "unreadable", "participants.tsv")] == \
        [True] * 3
    assert (failed["index"] == -1).all() and all("\n" not in e and str(source) not in e for e in errors)
    samples = read_tars(out)
    for shard, rows in manifest.groupby("shard"):
        keys = {s["__key__"] for s in samples[shard]}
        assert keys == set(rows.loc[rows["status"] == "ok", "key"])
        stats = json.loads((out / "shards" / f"{shard}_stats.json").read_text())
        assert (stats["ok"], stats["failed"]) == ((rows["status"] == "ok").sum(), (rows["status"] == "failed").sum())
    for shard in failed["shard"]:
        assert len(samples[shard]) > 0, f"{shard}: a bad scan cost its shard's good scans"
    assert_complete(out, set(manifest["key"]))


def test_failure_reasons_hold_no_raw_subject_id(bad_corpus):
    source, out, _ = bad_corpus
    raw_ids = [p.name.removeprefix("sub-") for p in source.glob("sub-*")]
    errors = " ".join(manifest_of(out)["error"].dropna())
    assert errors and not [rid for rid in raw_ids if rid in errors]


# ---- resume and determinism ---------------------------------------------------------------------------

# The build in a child with its own local Ray. Each task of the pass named in argv[1] first sleeps, so the
# kill lands mid-pass on a loaded machine too; the sleep changes no output.
CHILD = """
import json, sys, time
from pathlib import Path
import ray
import corpus_builder.build as build
from fmrilm.config import load_config

phase, source, out, overrides = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
task = getattr(build, phase + "_shard")

def throttled(*args, **kwargs):
    time.sleep(0.4)
    return task(*args, **kwargs)

setattr(build, phase + "_shard", throttled)
ray.init(address="local", num_cpus=2, include_dashboard=False)
build.build_corpus([source], load_config(None, overrides).corpus, out)
"""


def _session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _kill_build(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group, then whatever else of its session is left: Ray puts each worker
    in a process group of its own, so only the sweep of the session makes sure no task still writes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group's leader and members are gone already
        pass
    proc.wait()
    deadline = time.monotonic() + 30
    while (pids := _session_processes(proc.pid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not _session_processes(proc.pid), "processes of the killed build survive"


@pytest.mark.parametrize("phase, marker", [("extract", ".*.extract"), ("write", "*_stats.json")])
def test_killed_build_resumes_to_the_uninterrupted_corpus(cohort, corpus, tmp_path, phase, marker):
    reference, _ = corpus
    n_shards = len(list((reference / "shards").glob("*_stats.json")))
    out = tmp_path / "corpus"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, phase, str(cohort), str(out), json.dumps(OVERRIDES)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not 0 < len(done := list((out / "shards").glob(marker))) < n_shards:
            assert proc.poll() is None, f"build exited ({proc.returncode}) before the kill:\n" + \
                (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.005)
    finally:
        _kill_build(proc)
    finished = len(list((out / "shards").glob(marker)))
    assert 0 < len(done) <= finished < n_shards, "the kill did not land mid-pass"
    assert not (out / "complete.json").exists()

    summary = build_corpus([str(cohort)], corpus_config(), out)

    assert summary["scans"] == 16 and (out / "complete.json").exists()
    assert_complete(out, set(manifest_of(reference)["key"]))
    assert_same_corpus(reference, out)


def test_rebuild_is_byte_identical(cohort, corpus, tmp_path):
    reference, _ = corpus
    build_corpus([str(cohort)], corpus_config(), tmp_path / "again")
    assert_same_corpus(reference, tmp_path / "again")
    pd.testing.assert_frame_equal(manifest_of(reference), manifest_of(tmp_path / "again"))


def test_no_subject_straddles_splits(corpus):
    out, _ = corpus
    manifest = manifest_of(out)
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby("subject")["session"].nunique() == 2).all()  # two sessions each, same split
    assert (manifest.groupby("subject")["split"].nunique() == 1).all()
    split_of = dict(zip(manifest["key"], manifest["split"]))
    for tar, samples in read_tars(out).items():
        for sample in samples:
            split = json.loads(sample["meta.json"])["split"]
            assert split == split_of[sample["__key__"]] and tar.startswith(f"{split}-")


# ---- a finished corpus --------------------------------------------------------------------------------

def _no_discovery(*args, **kwargs):
    raise AssertionError("a finished corpus was rediscovered")


def test_finished_corpus_is_returned_without_discovery_or_ray(cohort, corpus, tmp_path, monkeypatch):
    import corpus_builder.build as build
    from fmrilm.stages import run_corpus_build
    from fmrilm.tracking import tracker_for

    summary = corpus[1]
    out = tmp_path / "corpus"  # a copy: the run below writes its resolved config into the corpus folder
    shutil.copytree(corpus[0], out)
    record = json.loads((out / "complete.json").read_text())
    assert record["summary"] == summary and record["seed"] == 0 and len(record["shards"]) == summary["shards"]
    ray.shutdown()  # the module's Ray: a second build must not start one
    try:
        with monkeypatch.context() as patch:
            patch.setattr(build, "discover_all", _no_discovery)
            assert build_corpus([str(cohort)], corpus_config(), out) == summary
        assert ray.is_initialized() is False

        # the pipeline's stage over it: the same summary, a run recorded, still no Ray
        cfg = load_config(None, OVERRIDES + [f"workdir={tmp_path / 'work'}"])
        result = run_corpus_build(cfg, [str(cohort)], out, tracker_for(cfg, cfg.workdir))
        assert result.summary == summary and result.run_id and ray.is_initialized() is False
    finally:
        _start_local_ray()


def test_changed_source_files_invalidate_the_finished_corpus(cohort, corpus, tmp_path):
    out, summary = corpus
    specs, cfg = [str(cohort)], corpus_config()
    assert finished_build(specs, cfg, out) == summary
    assert finished_build(specs, cfg, out, seed=1) is None  # another seed is another corpus

    series = sorted(cohort.glob("sub-*/*/func/*_timeseries.npy"))[3]
    stat = series.stat()
    try:
        os.utime(series, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes
        assert finished_build(specs, cfg, out) is None
        with pytest.raises(InputError, match="source files that have changed since") as err:
            build_corpus(specs, cfg, out)  # not resumed: its markers describe the old files
        assert "\n" not in str(err.value) and (out / "complete.json").exists()
    finally:
        os.utime(series, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert finished_build(specs, cfg, out) == summary

    extra = cohort / "sub-extra-notes.txt"  # a new file under the root counts too
    extra.write_text("x")
    try:
        assert finished_build(specs, cfg, out) is None
    finally:
        extra.unlink()
    assert finished_build(specs, cfg, out) == summary

    copy = tmp_path / "corpus"  # an output that lost a shard is not finished either
    shutil.copytree(out, copy)
    assert finished_build(specs, cfg, copy) == summary
    next((copy / "shards").glob("*.tar")).unlink()
    assert finished_build(specs, cfg, copy) is None


def test_zarr_attributes_name_the_padding_rows(corpus, bad_corpus):
    for out in (corpus[0], bad_corpus[1]):
        group = zarr.open_group(out / "timeseries.zarr", mode="r")
        keys = group["keys"][:]
        padding = group.attrs["padding_rows"]
        assert padding == [row for row, key in enumerate(keys) if key == ""]
        used = manifest_of(out)["index"]
        assert not set(padding) & set(used[used >= 0])
        if padding:
            assert not group["ts"][padding].any() and np.isnan(group["descriptors"][padding]).all()
    # 17 scans in one 64-row shard per split: every split's shard is padded
    assert len(zarr.open_group(bad_corpus[1] / "timeseries.zarr", mode="r").attrs["padding_rows"]) == 3 * 64 - 17


# ---- refusals -----------------------------------------------------------------------------------------

def test_corpus_of_another_config_is_refused_unless_overwrite(cohort, corpus, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(corpus[0], out)
    before = (out / "build.json").read_text()
    other = corpus_config("corpus.captions.include_numbers=true")
    with pytest.raises(InputError, match="another config") as err:
        build_corpus([str(cohort)], other, out)
    assert "\n" not in str(err.value) and (out / "build.json").read_text() == before
    assert_same_corpus(corpus[0], out)

    # how many workers built it is not "another config": the finished corpus is kept as it is
    build_corpus([str(cohort)], corpus_config("corpus.build.workers=1"), out)
    assert_same_corpus(corpus[0], out)

    summary = build_corpus([str(cohort)], other, out, overwrite=True)
    assert summary["ok"] == 16 and (out / "build.json").read_text() != before
    captions = [s["caption.txt"].decode() for samples in read_tars(out).values() for s in samples]
    assert any("z =" in c for c in captions)  # rebuilt with the new config, not resumed from the old one


def test_folder_that_is_not_a_corpus_is_refused_unless_overwrite(cohort, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a corpus") as err:
        build_corpus([str(cohort)], corpus_config(), out)
    assert "\n" not in str(err.value) and os.listdir(out) == ["notes.txt"]

    summary = build_corpus([str(cohort)], corpus_config(), out, overwrite=True)
    assert summary["ok"] == 16 and not (out / "notes.txt").exists()


@pytest.mark.parametrize("case, problem", [("missing", "does not exist"), ("empty", "no known source layout"),
                                           ("no scans", "no scans found")])
def test_missing_or_empty_source_is_a_one_line_input_error(tmp_path, monkeypatch, case, problem):
    root = tmp_path / "source"
    if case != "missing":
        root.mkdir()
    spec = str(root)
    if case == "no scans":  # a tables root with its participants but no series (and a lab secret set)
        (root / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\n")
        monkeypatch.setenv("FMRILM_PSEUDONYM_KEY", "k" * 32)
        spec = f"tables:{root}"
    with pytest.raises(InputError, match=problem) as err:
        build_corpus([spec], corpus_config(), tmp_path / "corpus")
    assert "\n" not in str(err.value) and str(root) in str(err.value)
    assert not (tmp_path / "corpus").exists()


# ---- a cluster ----------------------------------------------------------------------------------------

def test_two_node_cluster_build_matches_the_single_node_build(cohort, corpus, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # The Cluster records its address under $RAY_TMPDIR/ray; a private one keeps other `ray.init()`s on this
    # machine from attaching to it (short path: Ray's socket paths must stay under 108 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    ray.shutdown()
    try:
        with monkeypatch.context() as env:
            env.setenv("RAY_TMPDIR", ray_tmp)
            env.delenv("RAY_ADDRESS", raising=False)
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            try:
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                summary = build_corpus([str(cohort)], corpus_config(), tmp_path / "corpus",
                                       ray_address=cluster.address)
                nodes = [n for n in ray.nodes() if n["Alive"]]
                assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
                ray.shutdown()
                # Without an address a build starts its own local Ray of `workers` CPUs, also while a cluster
                # is this machine's recorded current one (`ray start` and Cluster write ray_current_cluster).
                assert (Path(ray_tmp) / "ray" / "ray_current_cluster").is_file()
                build_corpus([str(cohort)], corpus_config(), tmp_path / "local")
                assert [n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"]] == [2]
            finally:
                ray.shutdown()
                cluster.shutdown()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        _start_local_ray()
    assert summary["ok"] == 16
    assert_same_corpus(corpus[0], tmp_path / "corpus")
    assert_same_corpus(corpus[0], tmp_path / "local")
