"""A stage is one declaration (`fmrilm.stage.Stage`): toy stages added through a registry, with no edit to the
pipeline or the CLI, run, skip on a second run, resume after an interruption and obey --from / --only like the
built-in ones; one added to the built-in registry runs between the real stages of the shared tiny pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fmrilm.config import load_config
from fmrilm.pipeline import run_pipeline, summary_table
from fmrilm.runner import KEY_TAG, OUTPUT_RUN_TAG, STATUS_TAG, read_record
from fmrilm.stage import Registry, Stage, StageContext, StageResult
from fmrilm.stages import REGISTRY
from fmrilm.tracking import INPUT_RUN_TAG, PARENT_TAG
from fmrilm_core.errors import InputError
from tests.conftest import tiny_sets

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"
STEPS = 4
INTERRUPT = {"at": None}  # the step after whose checkpoint the next toy training run is killed


# ---- the toy stages: a "dataset" and a "training" that reads it, checkpointing every step -----------------------

def write_numbers(ctx: StageContext) -> StageResult:
    with ctx.run({"seed": ctx.cfg.seed}) as run:
        numbers = [(ctx.cfg.seed + i) % 7 for i in range(10)]
        ctx.out.mkdir(parents=True, exist_ok=True)
        (ctx.out / "numbers.json").write_text(json.dumps(numbers))
        run.log_metrics({"count": len(numbers)})
        return StageResult(ctx.name, ctx.out, run.run_id, {"count": len(numbers)})


def last_step(ctx: StageContext) -> int | None:
    steps = [int(p.stem.split("_")[1]) for p in ctx.out.glob("checkpoints/step_*.json")]
    return max(steps, default=None)


def train_sum(ctx: StageContext) -> StageResult:
    """Adds one number per step, from the last checkpoint on; the total is what it hands on."""
    numbers = json.loads((ctx.inputs["numbers"] / "numbers.json").read_text())
    start = last_step(ctx) or 0
    total = json.loads((ctx.out / "checkpoints" / f"step_{start}.json").read_text()) if start else 0
    with ctx.run({"steps": STEPS}) as run:
        (ctx.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for step in range(start + 1, STEPS + 1):
            total += numbers[step - 1]
            (ctx.out / "checkpoints" / f"step_{step}.json").write_text(json.dumps(total))
            if step == INTERRUPT["at"]:
                INTERRUPT["at"] = None
                raise KeyboardInterrupt
        (ctx.out / "total.json").write_text(json.dumps(total))
        run.log_metrics({"total": total})
        return StageResult(ctx.name, ctx.out, run.run_id, {"total": total, "started_after": start})


NUMBERS = Stage(name="numbers", key=lambda cfg: {"seed": cfg.seed}, run=write_numbers,
                done=lambda ctx: (ctx.out / "numbers.json").is_file())
TRAIN = Stage(name="sum", inputs={"numbers": "numbers"}, key=lambda cfg: {"seed": cfg.seed, "steps": STEPS},
              run=train_sum, done=lambda ctx: (ctx.out / "total.json").is_file(), resume=last_step,
              metric=lambda s: f"total {s['total']}" if "total" in s else "")


def statuses(result) -> dict[str, str]:
    return {s.name: s.status for s in result.stages}


# ---- a registry of toy stages only: fast --------------------------------------------------------------------

@pytest.fixture
def toy(tmp_path):
    registry = Registry()
    registry.add(NUMBERS)
    registry.add(TRAIN)
    return registry, load_config(None, [f"workdir={tmp_path / 'work'}", "name=toy"])


def test_a_toy_stage_runs_skips_and_resumes_through_the_registry(toy):
    registry, cfg = toy
    first = run_pipeline(cfg, registry=registry)
    assert statuses(first) == {"numbers": "ran", "sum": "ran"}
    work = Path(cfg.workdir)
    record = read_record(work / "sum")
    assert record["status"] == "complete" and record["summary"]["total"] == sum((i % 7) for i in range(STEPS))
    assert record["input_run_id"] == first.stages[0].run_id  # lineage: the run that made its input
    client = MlflowClient(first.tracking_uri)
    run = client.get_run(first.stages[1].run_id)
    assert run.data.tags[PARENT_TAG] == first.run_id and run.data.tags[INPUT_RUN_TAG] == first.stages[0].run_id
    assert run.data.tags[STATUS_TAG] == "ran" and run.data.tags[KEY_TAG] == record["key"]
    assert "total " in summary_table(first, registry).splitlines()[2]  # its declared headline figure

    second = run_pipeline(cfg, registry=registry)
    assert statuses(second) == {"numbers": "skipped", "sum": "skipped"}
    skipped = client.get_run(second.stages[1].run_id).data.tags
    assert skipped[STATUS_TAG] == "skipped" and skipped[OUTPUT_RUN_TAG] == first.stages[1].run_id
    assert skipped[INPUT_RUN_TAG] == first.stages[0].run_id
    assert read_record(work / "sum") == record

    # --from sum reruns it from scratch; killed after its step-2 checkpoint, it leaves a "running" record
    INTERRUPT["at"] = 2
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, registry=registry, from_stage="sum")
    assert read_record(work / "sum")["status"] == "running" and not (work / "sum" / "total.json").exists()

    resumed = run_pipeline(cfg, registry=registry)
    assert statuses(resumed) == {"numbers": "skipped", "sum": "resumed"}
    stage = resumed.stages[1]
    assert stage.resumed_from == 2 and stage.summary == {"total": record["summary"]["total"], "started_after": 2}
    assert "resumed from step 2" in summary_table(resumed, registry)
    assert client.get_run(stage.run_id).data.tags[STATUS_TAG] == "resumed"
    assert read_record(work / "sum")["resumed_from_step"] == 2

    assert statuses(run_pipeline(cfg, registry=registry)) == {"numbers": "skipped", "sum": "skipped"}
    assert statuses(run_pipeline(cfg, registry=registry, only="numbers")) == {"numbers": "ran"}
    # the input was made again: its run id is part of the reader's key, so the reader runs again
    assert statuses(run_pipeline(cfg, registry=registry)) == {"numbers": "skipped", "sum": "ran"}


def test_the_registry_keeps_readers_after_what_they_read():
    registry = Registry([NUMBERS])
    with pytest.raises(ValueError, match="register it after them"):
        Registry([TRAIN])
    with pytest.raises(ValueError, match="registered already"):
        registry.add(NUMBERS)
    with registry.added(TRAIN):
        assert registry.names() == ["numbers", "sum"]
        with pytest.raises(ValueError, match="read by sum"):
            registry.remove("numbers")
    assert registry.names() == ["numbers"]
    assert REGISTRY.names() == ["synth", "corpus", "tokenizer", "align", "instruct", "eval"]


def read_what_is_there(ctx: StageContext) -> StageResult:
    with ctx.run() as run:
        (ctx.out / "seen.json").write_text(json.dumps(sorted(ctx.inputs)))
        return StageResult(ctx.name, ctx.out, run.run_id, {"inputs": len(ctx.inputs)})


def test_a_stage_this_config_does_not_run_is_left_out_and_its_readers_go_without(tmp_path):
    """As synth is left out when the corpus has sources of its own, and the corpus then reads those."""
    optional = dataclasses.replace(NUMBERS, applies=lambda cfg: cfg.seed == 0)
    reader = Stage(name="reader", inputs={"numbers": "numbers"}, key=lambda cfg: {"seed": cfg.seed},
                   run=read_what_is_there, done=lambda ctx: (ctx.out / "seen.json").is_file())
    registry = Registry([optional, reader])
    without = run_pipeline(load_config(None, ["seed=1"]), tmp_path / "without", registry=registry)
    assert statuses(without) == {"reader": "ran"} and without.stages[0].summary == {"inputs": 0}
    assert not (tmp_path / "without" / "source").exists()
    with pytest.raises(InputError, match="--only numbers: not a stage of this config"):
        run_pipeline(load_config(None, ["seed=1"]), tmp_path / "without", registry=registry, only="numbers")
    with_it = run_pipeline(load_config(None, ["seed=0"]), tmp_path / "with", registry=registry)
    assert statuses(with_it) == {"numbers": "ran", "reader": "ran"} and with_it.stages[1].summary == {"inputs": 1}
    assert read_record(tmp_path / "with" / "reader")["input_run_id"] == with_it.stages[0].run_id


# ---- one toy stage added to the built-in registry, over the shared finished tiny pipeline ---------------------

def count_scans(ctx: StageContext) -> StageResult:
    summary = json.loads((ctx.inputs["corpus"] / "summary.json").read_text())
    with ctx.run() as run:
        ctx.out.mkdir(parents=True, exist_ok=True)
        (ctx.out / "count.json").write_text(json.dumps({"ok": summary["ok"]}))
        return StageResult(ctx.name, ctx.out, run.run_id, {"ok": summary["ok"]})


SCANS = Stage(name="scans", inputs={"corpus": "corpus"}, key=lambda cfg: {"seed": cfg.seed}, run=count_scans,
              done=lambda ctx: (ctx.out / "count.json").is_file(), metric=lambda s: f"{s['ok']} ok scans")


def test_a_stage_added_to_the_built_in_registry_runs_between_the_real_ones(tiny_pipeline, tiny_llm_dir):
    from typer.testing import CliRunner

    from fmrilm.cli import app

    _, first, work = tiny_pipeline
    cfg = load_config(DEMO, tiny_sets(tiny_llm_dir) + ["synth.seed=11", "tracking.experiment=toy"])
    with REGISTRY.added(SCANS, after="corpus"):
        result = run_pipeline(cfg, work)
        table = summary_table(result)
        listed = CliRunner().invoke(app, ["stages"])
        again = run_pipeline(cfg, work)
    assert [(s.name, s.status) for s in result.stages] == [
        ("synth", "skipped"), ("corpus", "skipped"), ("scans", "ran"), ("tokenizer", "skipped"),
        ("align", "skipped"), ("instruct", "skipped"), ("eval", "skipped")]
    assert statuses(again)["scans"] == "skipped"
    corpus_run = {s.name: s.run_id for s in first.stages}["corpus"]
    assert read_record(work / "scans")["input_run_id"] == corpus_run
    assert result.stages[2].summary == {"ok": 8} and "8 ok scans" in table
    assert listed.exit_code == 0 and "scans" in listed.output and "corpus<-corpus" in listed.output
    assert "scans" not in REGISTRY
