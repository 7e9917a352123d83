"""`fmrilm pipeline` skips what is done, reruns what changed (and what follows it), continues what was
interrupted, and reruns part of itself on request (--from / --only), on the tiny pipeline settings."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.launch import checkpoint_step
from fmrilm.config import load_config
from fmrilm.pipeline import run_pipeline, summary_table
from fmrilm.runner import KEY_TAG, OUTPUT_RUN_TAG, STATUS_TAG, PipelineResult, read_record, stage_key, stage_modes
from fmrilm.stage import StageResult
from fmrilm.tracking import INPUT_RUN_TAG, PARENT_TAG
from fmrilm_core.errors import InputError
from fmrilm_core.runtime import LocalRuntime
from tests.conftest import FMRILM, tiny_sets

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
FOLDERS = {"synth": "source", "corpus": "corpus", "tokenizer": "tokenizer", "align": "align", "instruct": "instruct",
           "eval": "eval"}
LINEAGE = {"corpus": "synth", "tokenizer": "corpus", "align": "tokenizer", "instruct": "align",
           "eval": "instruct"}  # whose run a stage's input comes from


def statuses(result: PipelineResult) -> dict[str, str]:
    return {s.name: s.status for s in result.stages}


def records(work: Path) -> dict[str, dict]:
    return {name: read_record(work / folder) for name, folder in FOLDERS.items()}


# ---- fast: the plan, the key, the table, bad flags ------------------------------------------------------


def test_from_and_only_plan_which_stages_run():
    names = ["synth", "corpus", "tokenizer", "align"]
    assert stage_modes(names) == dict.fromkeys(names, "auto")
    assert stage_modes(names, from_stage="tokenizer") == {"synth": "reuse", "corpus": "reuse", "tokenizer": "force",
                                                          "align": "force"}
    assert stage_modes(names, only="tokenizer") == {"synth": "reuse", "corpus": "reuse", "tokenizer": "force",
                                                    "align": "omit"}
    with pytest.raises(InputError, match="--only nope: not a stage of this config"):
        stage_modes(names, only="nope")
    with pytest.raises(InputError, match="exclude each other"):
        stage_modes(names, from_stage="corpus", only="align")
    with pytest.raises(InputError, match="--from synth"):  # a config with sources of its own has no synth stage
        stage_modes(["corpus", "tokenizer", "align"], from_stage="synth")


def test_stage_key_follows_config_and_the_run_that_made_each_input():
    corpus = {"key": "k1", "run_id": "r1", "out": "/somewhere"}
    key = stage_key("tokenizer", {"lr": 1e-4}, {"corpus": corpus})
    assert key == stage_key("tokenizer", {"lr": 1e-4}, {"corpus": corpus | {"out": "/moved"}})
    assert key != stage_key("tokenizer", {"lr": 2e-4}, {"corpus": corpus})
    assert key != stage_key("tokenizer", {"lr": 1e-4}, {"corpus": corpus | {"run_id": "r2"}})  # input rebuilt
    assert key != stage_key("align", {"lr": 1e-4}, {"corpus": corpus})


def test_summary_table_has_one_row_per_stage(tmp_path):
    result = PipelineResult(tmp_path, "sqlite:///x.db", "p")
    result.stages = [StageResult("corpus", tmp_path / "corpus", "a", {"ok": 5, "scans": 6}, "skipped", 0.21),
                     StageResult("tokenizer", tmp_path / "tokenizer", "b", {"reconstruction_r2": 0.4567}, "resumed",
                                 75.0, resumed_from=2)]
    lines = summary_table(result).splitlines()
    assert lines[0].split() == ["stage", "status", "time", "key", "metric", "output"]
    assert lines[1].split()[:5] == ["corpus", "skipped", "0.2", "s", "5/6"]
    assert "resumed from step 2" in lines[2] and "1:15" in lines[2] and "val R^2 0.457" in lines[2]
    assert lines[2].endswith(str(tmp_path / "tokenizer"))


def test_cli_refuses_an_unknown_stage_in_one_line(tmp_path):
    proc = subprocess.run([*FMRILM, "pipeline", "--only", "nope", "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --only nope: not a stage of this config (stages: synth, corpus, tokenizer, align, instruct, eval)"]
    assert not (tmp_path / "w").exists()  # refused before anything was written


# ---- over the shared finished pipeline (conftest's tiny_pipeline): nothing to do --------------------------


def test_second_run_over_a_finished_workdir_skips_every_stage(tiny_pipeline, tiny_llm_dir):
    cfg, first, work = tiny_pipeline
    before = {name: (work / folder / "stage.json").read_bytes() for name, folder in FOLDERS.items()}
    # the same config; its own MLflow experiment, so the first run's experiment stays as other tests expect it
    again = load_config(DEMO, tiny_sets(tiny_llm_dir) + ["synth.seed=11", "tracking.experiment=rerun"])
    result = run_pipeline(again, work)

    assert statuses(result) == dict.fromkeys(FOLDERS, "skipped")
    assert {name: (work / folder / "stage.json").read_bytes() for name, folder in FOLDERS.items()} == before
    first_runs = {s.name: s.run_id for s in first.stages}
    assert {s.name: s.output_run_id for s in result.stages} == first_runs  # outputs passed by their run id
    assert all(s.seconds < 30 for s in result.stages)  # a guard against a hidden rebuild, not a benchmark
    client = MlflowClient(result.tracking_uri)
    for stage in result.stages:
        run = client.get_run(stage.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[PARENT_TAG] == result.run_id
        assert run.data.tags[STATUS_TAG] == "skipped"
        assert run.data.tags[OUTPUT_RUN_TAG] == first_runs[stage.name]
        if stage.name in LINEAGE:  # lineage names the run that produced the input, not its skipped record
            assert run.data.tags[INPUT_RUN_TAG] == first_runs[LINEAGE[stage.name]]
    assert client.get_run(first_runs["tokenizer"]).data.tags[STATUS_TAG] == "ran"
    produced = records(work)
    assert produced["align"]["input_run_id"] == first_runs["tokenizer"]
    assert produced["align"]["inputs"]["corpus"]["run_id"] == first_runs["corpus"]
    assert client.get_run(first_runs["align"]).data.tags[KEY_TAG] == produced["align"]["key"]
    assert client.get_run(result.stages[1].run_id).data.metrics["ok"] == 8  # the record's figures travel along


def test_cli_prints_one_summary_table(tiny_pipeline, tiny_llm_dir):
    _, _, work = tiny_pipeline
    sets = [arg for item in tiny_sets(tiny_llm_dir) + ["synth.seed=11", "tracking.experiment=cli"]
            for arg in ("--set", item)]
    proc = subprocess.run([*FMRILM, "pipeline", "--config", str(DEMO), *sets, "--workdir", str(work)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "status"])
    table = [line.split() for line in lines[header + 1: header + 7]]
    assert [row[:2] for row in table] == [[name, "skipped"] for name in FOLDERS]
    assert table[1][4] == "8/8" and table[2][4:6] == ["val", "R^2"] and table[3][4:6] == ["val", "F2F"]
    assert table[4][4:7] == ["val", "answer", "loss"]
    assert "eval (test split)" in proc.stdout and "fc_baseline" in proc.stdout  # the eval stage's table follows


def test_a_size_set_explicitly_must_agree_with_the_corpus(tiny_pipeline, tiny_llm_dir, tmp_path):
    """N and T come from the corpus (12 ROIs, 32 volumes here) unless the config sets them: then they must agree,
    or the tokenizer stage fails in one line naming the key, its value and the corpus's size, before any work."""
    from fmrilm.ablations import variant_config
    from fmrilm.stages import with_corpus_sizes

    _, _, work = tiny_pipeline
    corpus = work / "corpus"
    read = with_corpus_sizes(load_config(None), corpus).tokenizer.model
    assert (read.n_rois, read.length) == (12, 32)
    agreeing = load_config(None, ["tokenizer.model.n_rois=12", "tokenizer.model.length=32"])
    assert with_corpus_sizes(agreeing, corpus) is agreeing
    with pytest.raises(InputError, match=r"^tokenizer\.model\.n_rois=450 disagrees with the corpus "
                                         + re.escape(str(corpus)) + r", which has 12 ROIs \(leave tokenizer"):
        with_corpus_sizes(load_config(None, ["tokenizer.model.n_rois=450"]), corpus)
    yaml_file = tmp_path / "sizes.yaml"
    yaml_file.write_text("tokenizer:\n  model:\n    length: 160\n")
    with pytest.raises(InputError, match="tokenizer.model.length=160 disagrees .* 32 volumes per scan"):
        with_corpus_sizes(load_config(yaml_file), corpus)
    # an ablation variant leaves unset what the main config left unset: its sizes still come from the corpus
    variant = variant_config(load_config(None, ["tokenizer.model.dim=8"]), "v", ["tokenizer.steps=3"])
    assert with_corpus_sizes(variant, corpus).tokenizer.model.n_rois == 12

    sets = [arg for item in tiny_sets(tiny_llm_dir) + [f"workdir={tmp_path / 'w'}", "tokenizer.model.n_rois=450"]
            for arg in ("--set", item)]
    proc = subprocess.run([*FMRILM, "tokenizer", "train", "--corpus", str(corpus), "--out", str(tmp_path / "tok"),
                           *sets], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: tokenizer.model.n_rois=450 disagrees with the corpus {corpus}, which has 12 ROIs (leave "
        "tokenizer.model.n_rois unset to take the corpus's)"]
    assert not (tmp_path / "tok").exists() and not (tmp_path / "w").exists()  # refused before anything was written


# ---- on a workdir of their own (slow: a full tiny pipeline, then partial reruns) ---------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llm_dir):
    """A finished tiny pipeline whose tokenizer keeps checkpoints at steps 2 and 4."""
    import ray

    work = tmp_path_factory.mktemp("resume") / "work"
    sets = tiny_sets(tiny_llm_dir) + ["tokenizer.steps=4", "tokenizer.eval_every=4", "synth.seed=5"]
    try:
        result = run_pipeline(load_config(DEMO, sets), work)
    finally:
        ray.shutdown()
    assert statuses(result) == dict.fromkeys(FOLDERS, "ran")
    return sets, work


@pytest.mark.slow
def test_a_changed_key_reruns_its_stage_and_the_later_ones_only(finished):
    sets, work = finished
    before = records(work)
    result = run_pipeline(load_config(DEMO, sets + ["align.optim.lr=2.0e-3"]), work)
    assert statuses(result) == {"synth": "skipped", "corpus": "skipped", "tokenizer": "skipped", "align": "ran",
                                "instruct": "ran", "eval": "ran"}
    after = records(work)
    assert {k: after[k] for k in ("synth", "corpus", "tokenizer")} == {k: before[k] for k in ("synth", "corpus",
                                                                                               "tokenizer")}
    assert after["align"]["key"] != before["align"]["key"] and after["align"]["run_id"] == result.stages[3].run_id
    assert after["align"]["input_run_id"] == before["tokenizer"]["run_id"]  # the tokenizer's producing run
    assert after["align"]["config"]["align"]["optim"]["lr"] == 2.0e-3


@pytest.mark.slow
def test_an_interrupted_training_stage_resumes_and_only_reruns_one_stage(finished, monkeypatch):
    """A tokenizer of a new config is killed right after its step-2 checkpoint (no completion record); the next
    pipeline continues it from that checkpoint and reruns align, which reads it. `--only tokenizer` then retrains
    it from scratch, reading the corpus from the workdir: the same final figures as the resumed run."""
    sets, work = finished
    cfg = load_config(DEMO, sets + ["tokenizer.optim.lr=5.0e-4"])
    first_align = read_record(work / "align")

    class KilledAfterStep2(LocalRuntime):
        def commit_checkpoint(self, directory, step, metrics):
            super().commit_checkpoint(directory, step, metrics)
            if step == 2:
                raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("cluster.launch.LocalRuntime", KilledAfterStep2)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg, work)
    interrupted = read_record(work / "tokenizer")
    assert interrupted["status"] == "running"  # started, never completed
    assert checkpoint_step(work / "tokenizer") == 2  # the other config's step-4 checkpoint was cleared first
    assert not (work / "tokenizer" / "tokenizer").exists()

    resumed = run_pipeline(cfg, work)
    assert statuses(resumed) == {"synth": "skipped", "corpus": "skipped", "tokenizer": "resumed", "align": "ran",
                                 "instruct": "ran", "eval": "ran"}
    tokenizer, align = resumed.stages[2], resumed.stages[3]
    assert tokenizer.resumed_from == 2 and "resumed from step 2" in summary_table(resumed)
    client = MlflowClient(resumed.tracking_uri)
    assert client.get_run(tokenizer.run_id).data.tags[STATUS_TAG] == "resumed"
    assert client.get_run(align.run_id).data.tags[INPUT_RUN_TAG] == tokenizer.run_id
    assert read_record(work / "align")["key"] != first_align["key"]

    only = run_pipeline(cfg, work, only="tokenizer")
    assert statuses(only) == {"synth": "reused", "corpus": "reused", "tokenizer": "ran"}
    fresh = only.stages[2]
    assert fresh.resumed_from is None and fresh.run_id != tokenizer.run_id
    assert client.get_run(fresh.run_id).data.tags[INPUT_RUN_TAG] == read_record(work / "corpus")["run_id"]
    assert read_record(work / "align")["input_run_id"] == tokenizer.run_id  # align left as it was
    assert fresh.summary.keys() == tokenizer.summary.keys()
    for name, value in fresh.summary.items():  # batches depend only on seed and step: resume repeats the run
        assert tokenizer.summary[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
