"""Fault injection: a Ray Train worker process killed with a real SIGKILL mid-run. The worker group restarts from
the last checkpoint Ray registered and ends with exactly the final metrics of an uninterrupted run (CPU, gloo,
fixed seeds: batches and random draws depend only on seed, step and rank), for stage 1 and stage 2.

How the test finds its victim: the training function is wrapped (inside the test, so it travels to the workers
by value) to write a marker per worker start (pid, rank, the step it resumed from) and per checkpoint report.
Ray's state API (`ray.util.state.list_actors`) would name the RayTrainWorker actors too, but it needs the
dashboard, which `run_training` does not start, and it cannot say which actor is which rank or whether its
checkpoint has been reported. The kill waits until Ray's controller has registered a checkpoint (its snapshot
in the run's storage lists one): a worker killed before that would lose the report queued in its own process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster.launch import run_training
from fmrilm_core.checkpoint import CLIENT_STATE
from llm_train.train import AlignInputs
from llm_train.train import train as train_align
from tests.conftest import align_cfg, brain_tokenizer_cfg
from tokenizer_train.train import TokenizerInputs
from tokenizer_train.train import train as train_tokenizer

ROOT = Path(__file__).parents[1]
ZERO2 = str(ROOT / "configs" / "deepspeed" / "zero2.json")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints its controller registered
VICTIM_RANK = 1


def marking(train_fn, marks: Path, pause_s: float):
    """`train_fn` writing markers into `marks`: `start-<pid>.json` when a worker starts (rank, pid, resumed step)
    and `report-<rank>-<step>-<pid>` after each checkpoint report; a worker that starts fresh pauses `pause_s`
    after each report, so the run is still going when the kill lands (the pause changes no result)."""
    def run(cfg, inputs, runtime):
        latest = runtime.latest_checkpoint()
        resumed = json.loads((Path(latest) / CLIENT_STATE).read_text())["step"] if latest is not None else None
        pid = os.getpid()
        (marks / f"start-{pid}.json").write_text(json.dumps({"rank": runtime.rank, "pid": pid, "resumed": resumed}))
        commit = runtime.commit_checkpoint

        def commit_and_mark(directory, step, metrics):
            commit(directory, step, metrics)
            (marks / f"report-{runtime.rank}-{step}-{pid}").touch()
            if resumed is None:
                time.sleep(pause_s)

        runtime.commit_checkpoint = commit_and_mark
        return train_fn(cfg, inputs, runtime)

    return run


def registered_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray's controller has registered for the run, None before the first."""
    try:
        latest = json.loads((run_dir / SNAPSHOT).read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return int(latest["metrics"]["step"]) if latest else None


class Killer(threading.Thread):
    """SIGKILLs the worker of VICTIM_RANK once Ray has registered a checkpoint of the run (one kill)."""

    def __init__(self, marks: Path, run_dir: Path, timeout_s: float = 900):
        super().__init__(daemon=True)
        self.marks, self.run_dir, self.deadline = marks, run_dir, time.monotonic() + timeout_s
        self.killed: dict | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and time.monotonic() < self.deadline:
            step = registered_step(self.run_dir)
            victims = [json.loads(p.read_text()) for p in self.marks.glob("start-*.json")]
            victims = [v for v in victims if v["rank"] == VICTIM_RANK and v["resumed"] is None]
            if step is not None and victims:
                os.kill(victims[0]["pid"], signal.SIGKILL)
                self.killed = {"pid": victims[0]["pid"], "registered_step": step}
                return
            time.sleep(0.05)


def starts(marks: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in marks.glob("start-*.json")),
                  key=lambda s: (s["resumed"] is not None, s["rank"]))


def straight_and_killed(train_fn, cfg, make_inputs, tmp_path: Path, pause_s: float = 1.0) -> tuple[dict, dict, dict]:
    """Final metrics of an uninterrupted 2-worker run and of one whose rank-1 worker is SIGKILLed after the first
    registered checkpoint; and what the kill did (pid, registered step, the worker starts)."""
    import ray

    try:
        straight_marks = tmp_path / "straight_marks"
        straight_marks.mkdir()
        straight = run_training(marking(train_fn, straight_marks, pause_s), cfg, make_inputs(tmp_path / "straight"),
                                workers=2, log_fn=None, storage=tmp_path / "straight_ray", name="run")
        marks = tmp_path / "killed_marks"
        marks.mkdir()
        killer = Killer(marks, tmp_path / "killed_ray" / "run")
        killer.start()
        try:
            killed = run_training(marking(train_fn, marks, pause_s), cfg, make_inputs(tmp_path / "killed"),
                                  workers=2, log_fn=None, storage=tmp_path / "killed_ray", name="run", max_failures=2)
        finally:
            killer.done.set()
            killer.join()
    finally:
        ray.shutdown()
    return straight, killed, {"kill": killer.killed, "starts": starts(marks)}


def assert_same_metrics(killed: dict, straight: dict) -> None:
    """Exactly equal, NaN included (a figure with nothing to measure is NaN in both)."""
    assert killed.keys() == straight.keys()
    differ = {k: (killed[k], straight[k]) for k in straight
              if not (killed[k] == straight[k] or (math.isnan(killed[k]) and math.isnan(straight[k])))}
    assert not differ, differ


def assert_restarted_from_checkpoint(what: dict, steps: int) -> None:
    print(f"killed: {what['kill']}; worker starts: {what['starts']}")  # shown with -s
    assert what["kill"] is not None, "the worker was never killed"
    first = [s for s in what["starts"] if s["resumed"] is None]
    again = [s for s in what["starts"] if s["resumed"] is not None]
    assert sorted(s["rank"] for s in first) == [0, 1]
    # the whole group came back (new processes), every rank from the same checkpoint, no earlier than the one
    # registered before the kill
    assert sorted(s["rank"] for s in again) == [0, 1], what
    assert len({s["resumed"] for s in again}) == 1
    assert what["kill"]["registered_step"] <= again[0]["resumed"] < steps
    assert what["kill"]["pid"] not in {s["pid"] for s in again}


@pytest.mark.slow
def test_tokenizer_worker_killed_mid_run_restarts_from_checkpoint_with_the_same_metrics(stage1, llm_dir, tmp_path):
    corpus, _ = stage1
    steps = 12
    cfg = brain_tokenizer_cfg(llm_dir, batch_size=2, steps=steps, checkpoint_every=2, eval_every=steps,
                              deepspeed=ZERO2)
    straight, killed, what = straight_and_killed(train_tokenizer, cfg, lambda out: TokenizerInputs(corpus, out),
                                                 tmp_path)
    assert_restarted_from_checkpoint(what, steps)
    assert straight["step"] == killed["step"] == steps
    assert_same_metrics(killed, straight)  # every loss, R^2, usage, probe and retrieval figure


@pytest.mark.slow
def test_align_worker_killed_mid_run_restarts_from_checkpoint_with_the_same_metrics(stage1, llm_dir, tmp_path):
    corpus, tokenizer = stage1
    steps = 8
    cfg = align_cfg(llm_dir, steps=steps, checkpoint_every=2, eval_every=steps, deepspeed=ZERO2,
                    lora={"enabled": True, "r": 2, "alpha": 4},
                    eval={"scans": 4, "caption_scans": 2, "max_new_tokens": 4, "t2t_docs": 2})
    straight, killed, what = straight_and_killed(train_align, cfg, lambda out: AlignInputs(corpus, tokenizer, out),
                                                 tmp_path)
    assert_restarted_from_checkpoint(what, steps)
    assert straight["step"] == killed["step"] == steps
    assert_same_metrics(killed, straight)  # losses, F2F accuracy and baselines, caption fidelity, perplexities
