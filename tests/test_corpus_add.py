"""A corpus that grows and proves its integrity (`corpus_builder.grow`, `versions`, `info`; docs/corpus.md): a second
wave added beside the first without touching it, kill -9 during an add, damage found and mended, bad adds refused
before anything is written, and a model trained on the first wave evaluated on the grown corpus.

The cohort: 12 synthetic subjects x 2 sessions (12 ROIs, one pseudonym secret). Wave 1 holds session 1 of subjects
1-8; wave 2 session 2 of those 8 (new sessions of known subjects) and both sessions of subjects 9-12 (new subjects).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import webdataset as wds
from mlflow.tracking import MlflowClient

from corpus_builder.build import build_corpus
from corpus_builder.config import SynthConfig
from corpus_builder.grow import add_to_corpus, repair
from corpus_builder.info import corpus_info
from corpus_builder.readers import open_zarr, read_captions, read_manifest, read_norms, shard_urls
from corpus_builder.synth import synthesize
from corpus_builder.versions import verify
from fmrilm.config import load_config, save_resolved
from fmrilm_core.errors import InputError
from tests.conftest import N_ROIS, T
from tests.test_build import _kill_build

REPO = Path(__file__).parents[1]
OVERRIDES = [f"corpus.source.cleaning.length={T}", f"corpus.source.atlas.n_rois={N_ROIS}",
             "corpus.build.shard_size=4", "corpus.build.workers=2", "corpus.splits.fractions=[0.5,0.2,0.3]"]


def corpus_config():
    return load_config(None, OVERRIDES).corpus


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def waves(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grow")
    full = root / "full"
    full.mkdir()
    (full / ".pseudonym_key").write_text("c" * 64)
    synthesize(SynthConfig(subjects=12, sessions=2, length_scale=0.3, datasets=["UKB", "ABCD"], n_rois=N_ROIS), full)
    first, second = root / "wave1", root / "wave2"
    for wave in (first, second):
        wave.mkdir()
        for f in full.iterdir():
            if f.is_file():  # participants, atlas table, synth.json, the pseudonym key
                shutil.copy(f, wave / f.name)
    for i, subject in enumerate(sorted(p.name for p in full.glob("sub-*"))):
        for n, session in enumerate(sorted((full / subject).glob("ses-*"))):
            wave = first if i < 8 and n == 0 else second
            shutil.copytree(session, wave / subject / session.name)
    return first, second


@pytest.fixture(scope="module")
def grown(waves, tmp_path_factory) -> dict:
    """Wave 1 built, its files hashed, then wave 2 added (a copy of wave 1 kept as it was)."""
    first, second = waves
    root = tmp_path_factory.mktemp("grown")
    out = root / "corpus"
    build_corpus([str(first)], corpus_config(), out)
    # as `fmrilm corpus build` leaves it: the config it ran with (the CLI's add logs to that workdir's MLflow store)
    save_resolved(load_config(None, [*OVERRIDES, f"workdir={root / 'work'}"]), out)
    shutil.copytree(out, root / "v1")
    before = file_hashes(out)
    result = add_to_corpus([str(second)], out)
    return {"out": out, "v1": root / "v1", "before": before, "result": result}


def file_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


MUTABLE = ("complete.json", "summary.json")  # the commit point and its summary; zarr.json: array shapes


def test_add_writes_new_shards_beside_byte_identical_old_ones(grown):
    out, before, result = grown["out"], grown["before"], grown["result"]
    after = file_hashes(out)
    changed = [p for p, h in before.items() if after.get(p) != h and p not in MUTABLE
               and not p.endswith("zarr.json")]
    assert changed == []  # tars, manifest parts, markers, zarr blocks, manifest, norms, reference: untouched
    new = sorted(set(after) - set(before))
    assert all(p.startswith(("shards/", "timeseries.zarr/", "versions/")) for p in new) and new
    assert result["version"] == 2 and result["subjects"] == 4 and result["sessions_of_known_subjects"] == 8
    assert result["scans"] == 16 and not (out / "staging").exists()


def test_splits_are_stable_and_new_sessions_join_their_subject(grown):
    out, v1 = grown["out"], grown["v1"]
    old, now = read_manifest(v1).set_index("key"), read_manifest(out).set_index("key")
    assert (now.loc[old.index, "split"] == old["split"]).all()
    assert (now.groupby("subject")["split"].nunique() == 1).all()  # a subject's new session joins its split
    assert set(now.loc[now["version"] == 2, "split"]) <= {"train", "val", "test"}
    assert (now.loc[old.index, "version"] == 1).all() and (now["version"] == 2).sum() == 16
    assert set(now.loc[now["version"] == 2].query("subject not in @old.subject")["split"])  # new subjects split


def test_readers_see_both_waves_and_new_scans_use_the_frozen_norms(grown):
    out, v1 = grown["out"], grown["v1"]
    assert read_norms(out) == read_norms(v1)
    manifest = read_manifest(out)
    ok = manifest[manifest["status"] == "ok"]
    zarr_corpus = open_zarr(out)
    assert set(zarr_corpus.keys()) == set(ok["key"])
    for split in ("train", "val", "test"):
        assert set(read_captions(out, split)) == set(ok.loc[ok["split"] == split, "key"])
    norms = read_norms(out)
    key = ok.loc[ok["version"] == 2, "key"].iloc[0]
    tar = next(u for u in shard_urls(out, ok.loc[ok["key"] == key, "split"].iloc[0])
               if Path(u).stem == ok.loc[ok["key"] == key, "shard"].iloc[0])
    sample = next(s for s in wds.WebDataset(tar, shardshuffle=False, empty_check=False) if s["__key__"] == key)
    assert np.array_equal(np.load(io.BytesIO(sample["ts.npy"])), zarr_corpus[key])
    desc = json.loads(sample["desc.json"])["descriptors"]
    name = next(n for n, d in desc.items() if d["z"] == d["z"] and norms["std"][n] > 0)
    assert desc[name]["z"] == pytest.approx((desc[name]["value"] - norms["mean"][name]) / norms["std"][name])


def test_re_adding_adds_nothing_and_info_and_verify_see_two_versions(grown, waves):
    out = grown["out"]
    complete = (out / "complete.json").read_bytes()
    assert add_to_corpus([str(waves[1])], out)["added"] == 0
    assert (out / "complete.json").read_bytes() == complete
    info = corpus_info(out)
    assert info["version"] == 2 and [v["version"] for v in info["versions"]] == [1, 2]
    assert info["by"]["version"] == {"1": 8, "2": 16} and info["qc"]["original_tr"]["n"] == info["ok"]
    report = verify(out)
    assert report["problems"] == [] and report["files_checked"] > 40
    cli = [sys.executable, "-m", "fmrilm.cli", "corpus"]
    shown = subprocess.run([*cli, "info", str(out), "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["by"]["version"] == {"1": 8, "2": 16}
    again = subprocess.run([*cli, "add", "--corpus", str(out), "--source", str(waves[1]), "--set",
                            "corpus.build.workers=1"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "nothing to add" in again.stdout
    changed = subprocess.run([*cli, "add", "--corpus", str(out), "--source", str(waves[1]), "--set",
                              "corpus.build.shard_size=8"], cwd=REPO, capture_output=True, text=True)
    assert changed.returncode == 2 and "corpus.build.shard_size differs" in changed.stderr


def test_bad_adds_are_one_line_errors_and_write_nothing(grown, waves, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(grown["v1"], v1)
    before = file_hashes(v1)
    other = tmp_path / "other"
    (other).mkdir()
    (other / ".pseudonym_key").write_text("c" * 64)
    synthesize(SynthConfig(subjects=2, length_scale=0.3, datasets=["UKB"], n_rois=16, seed=5), other)
    with pytest.raises(InputError, match="16 ROIs, the corpus .* has 12") as err:
        add_to_corpus([str(other)], v1)
    rekeyed = tmp_path / "rekeyed"
    shutil.copytree(waves[1], rekeyed)
    (rekeyed / ".pseudonym_key").write_text("d" * 64)
    with pytest.raises(InputError, match="another secret"):
        add_to_corpus([str(rekeyed)], v1)
    assert file_hashes(v1) == before and "\n" not in str(err.value)

    norms = json.loads((v1 / "norms.json").read_text())
    norms["count"] += 1
    (v1 / "norms.json").write_text(json.dumps(norms))
    with pytest.raises(InputError, match="norms.json: does not match version 1"):
        add_to_corpus([str(waves[1])], v1)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(grown["v1"], unfinished)
    (unfinished / "complete.json").unlink()
    with pytest.raises(InputError, match="build never finished"):
        add_to_corpus([str(waves[1])], unfinished)
    assert not (v1 / "staging").exists() and not (unfinished / "staging").exists()


CHILD = """
import json, sys, time
from pathlib import Path
import ray
import corpus_builder.build as build
import corpus_builder.grow as grow

second, out = sys.argv[1], Path(sys.argv[2])
task = build.write_shard

def throttled(*args, **kwargs):
    time.sleep(0.4)
    return task(*args, **kwargs)

build.write_shard = throttled
ray.init(address="local", num_cpus=2, include_dashboard=False)
grow.add_to_corpus([second], out)
"""


def test_killed_add_leaves_the_previous_version_and_resumes_to_the_uninterrupted_corpus(grown, waves, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(grown["v1"], out)
    n_new = len(json.loads((grown["out"] / "versions" / "v0002.json").read_text())["shards"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(waves[1]), str(out)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    staged = out / "staging" / "shards"
    try:
        deadline = time.monotonic() + 240
        while not 0 < len(done := list(staged.glob("*_stats.json"))) < n_new:
            assert proc.poll() is None, "add exited before the kill:\n" + (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.005)
    finally:
        _kill_build(proc)
    assert 0 < len(done) < n_new
    # still version 1 for every reader: its manifest, its shards, its zarr rows
    assert json.loads((out / "complete.json").read_text())["version"] == 1
    assert set(read_manifest(out)["key"]) == set(read_manifest(grown["v1"])["key"])
    assert sorted(Path(u).name for s in ("train", "val", "test") for u in shard_urls(out, s)) == \
        sorted(p.name for p in (grown["v1"] / "shards").glob("*.tar"))
    assert set(open_zarr(out).keys()) == set(open_zarr(grown["v1"]).keys())

    resumed = subprocess.run([sys.executable, "-m", "fmrilm.cli", "corpus", "add", "--corpus", str(out), "--source",
                              str(waves[1])], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.startswith("version 2: +16 scans")
    # the add is an MLflow run in the build's store: its figures and the new version's record
    client = MlflowClient(f"sqlite:///{grown['out'].parent / 'work' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "attributes.run_name = 'corpus-add' and attributes.status = 'FINISHED'")
    logged = [r for r in runs if r.data.params["corpus"] == str(out)]
    assert len(logged) == 1 and logged[0].data.tags["corpus.version"] == "2"
    assert logged[0].data.metrics["added"] == 16 and logged[0].data.metrics["version"] == 2
    assert [a.path for a in client.list_artifacts(logged[0].info.run_id)] == ["v0002.json"]
    same, other = file_hashes(out), file_hashes(grown["out"])
    records = [p for p in same if p.startswith("versions/v") and p.endswith(".json")]
    for name in records:  # equal but for the time they were written
        a, b = (json.loads((root / name).read_text()) for root in (out, grown["out"]))
        assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}
    timed = {"complete.json", "summary.json", *records} | {p for p in same if p.endswith("_stats.json")}
    assert {p: h for p, h in same.items() if p not in timed} == {p: h for p, h in other.items() if p not in timed}


def test_verify_names_a_truncated_tar_and_an_overwritten_zarr_block_and_repair_mends_them(grown, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(grown["out"], out)
    original = file_hashes(out)
    v2 = json.loads((out / "versions" / "v0002.json").read_text())
    tar = out / "shards" / f"{v2['shards'][0]}.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    v1 = json.loads((out / "versions" / "v0001.json").read_text())
    victim = v1["shards"][1]
    block = next(p for p in v1["checksums"]["shards"][victim] if p.startswith("timeseries.zarr/ts/"))
    (out / block).write_bytes(os.urandom((out / block).stat().st_size))
    edited = pd.read_parquet(out / v2["manifest"])
    row = edited.index[edited["split"] == "train"][0]
    edited.loc[row, "split"] = "test"  # a train scan slipped into the test split by hand
    edited.to_parquet(out / v2["manifest"], index=False)

    report = verify(out)
    problems = {p["path"]: p for p in report["problems"]}
    assert problems[v2["manifest"]]["problem"].endswith(
        f"row of scan {edited.loc[row, 'key']}: split is 'test', its shard records 'train'")
    assert problems[f"shards/{v2['shards'][0]}.tar"]["problem"].startswith("truncated")
    assert problems[block]["problem"] == "content changed (sha256 differs)" and problems[block]["shard"] == victim
    assert report["damaged_shards"] == sorted([v2["shards"][0], victim])
    result = subprocess.run([sys.executable, "-m", "fmrilm.cli", "corpus", "verify", str(out)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and f"{v2['shards'][0]}.tar: truncated" in result.stderr

    mended = repair(out)
    assert mended["problems"] == [] and sorted(mended["repaired"]) == sorted([v2["shards"][0], victim,
                                                                               v2["manifest"]])
    now = file_hashes(out)
    assert {p: now[p] for p in original if not p.endswith("_stats.json")} == \
        {p: h for p, h in original.items() if not p.endswith("_stats.json")}


def test_a_model_trained_before_the_add_is_evaluated_on_the_grown_corpus(grown, llm_dir, tmp_path):
    from evaluation.task_eval import evaluate_tasks
    from fmrilm_core.runtime import LocalRuntime
    from llm_train.train import AlignInputs
    from llm_train.train import train as train_align
    from tests.conftest import align_cfg, train_brain_tokenizer

    v1 = tmp_path / "corpus"  # the model's corpus, grown after it was trained
    shutil.copytree(grown["v1"], v1)
    tok = train_brain_tokenizer(v1, llm_dir, tmp_path / "tok", steps=2)
    cfg = align_cfg(llm_dir, steps=2, checkpoint_every=2, eval_every=2, max_caption_tokens=16,
                    eval={"scans": 2, "caption_scans": 2, "max_new_tokens": 2, "t2t_docs": 2})
    model = tmp_path / "llm"
    train_align(cfg, AlignInputs(v1, tok, model), LocalRuntime(model / "checkpoints"))
    add_to_corpus(json.loads((grown["out"] / "versions" / "v0002.json").read_text())["sources"], v1)

    evaluate_tasks(model, v1, tmp_path / "E", tasks=["sex"], shots=(0,), examples=0, max_new_tokens=2,
                   device="cpu")
    info = json.loads((tmp_path / "E" / "eval.json").read_text())
    new = info["lineage_check"]["new_test_scans"]
    manifest = read_manifest(v1)
    test_new = manifest[(manifest["split"] == "test") & (manifest["version"] == 2) & (manifest["status"] == "ok")]
    assert new["since_version"] == 1 and new["keys"] == sorted(test_new["key"]) and new["scans"] > 0
    assert info["corpus_fingerprint"]["version"] == 2 and info["test_scans"] == int(
        ((manifest["split"] == "test") & (manifest["status"] == "ok")).sum())


def test_a_corpus_built_before_versions_is_recorded_by_its_first_add(grown, waves, tmp_path):
    legacy = tmp_path / "corpus"
    shutil.copytree(grown["v1"], legacy)
    shutil.rmtree(legacy / "versions")  # as a build before versions left it: no records, complete.json without them
    complete = json.loads((legacy / "complete.json").read_text())
    (legacy / "complete.json").write_text(json.dumps({k: v for k, v in complete.items()
                                                      if k not in ("version", "manifest")}))
    with pytest.raises(InputError, match="built before corpora recorded versions"):
        verify(legacy)
    with pytest.raises(InputError, match="pass the --config"):
        add_to_corpus([str(waves[1])], legacy)
    rekeyed = tmp_path / "rekeyed"
    shutil.copytree(waves[1], rekeyed)
    (rekeyed / ".pseudonym_key").write_text("d" * 64)
    before = file_hashes(legacy)
    with pytest.raises(InputError, match="another secret"):  # a bad first add records nothing either
        add_to_corpus([str(rekeyed)], legacy, corpus_config())
    assert file_hashes(legacy) == before
    assert add_to_corpus([str(waves[1])], legacy, corpus_config())["version"] == 2
    first = json.loads((legacy / "versions" / "v0001.json").read_text())
    assert "recorded" in first and first["config"] == corpus_config().model_dump(mode="json")
    assert verify(legacy)["problems"] == []
    assert set(read_manifest(legacy)["key"]) == set(read_manifest(grown["out"])["key"])
