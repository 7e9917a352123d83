"""Progress off a terminal (`fmrilm.progress`): plain lines at a steady interval with stage, n / total, rate,
ETA and the latest metric; and the one place third-party chatter is turned down (`cluster.logs`).

Every test writes stderr to a real file (not a terminal) and waits for the line it needs instead of
sleeping, so nothing depends on how fast this machine is; no assertion is about wall-clock time.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmrilm.progress import StepReporter, log_interval, no_progress, progress_bar

LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<stage>.+?)  (?P<unit>step )?(?P<done>\d+)/(?P<total>\d+) \(\d+%\)  "
                  r"(?P<rate>-|[\d.]+)/(?:s|min)  elapsed \d+:\d\d(?:  ETA (?P<eta>\?|\d+:\d\d(?::\d\d)?))?"
                  r"(?P<rest>.*)$")


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A plain file for stderr (not a terminal, also in rich's eyes), interval 0.05 s. Tests swap it in with
    `redirected(path)` in their body: pytest sets its own capture object as sys.stderr when a test's call
    phase starts, so a swap made in fixture set-up would be undone."""
    for name in ("FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FMRILM_LOG_INTERVAL", "0.05")
    return tmp_path / "stderr.log"


@contextlib.contextmanager
def redirected(path: Path):
    with open(path, "a") as stream, contextlib.redirect_stderr(stream):
        yield


def lines_of(path: Path) -> list[str]:
    sys.stderr.flush()
    return path.read_text().splitlines() if path.exists() else []


def wait_for_line(path: Path, pattern: str, timeout: float = 60.0) -> str:
    """The first line matching `pattern` once the reporter's thread has printed it (a safety timeout only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines_of(path):
            if re.search(pattern, line):
                return line
        time.sleep(0.01)
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(lines_of(path)))


def parsed(line: str) -> dict:
    match = LINE.match(line)
    assert match, line
    return match.groupdict()


def test_plain_lines_off_a_terminal_say_stage_count_rate_eta_and_loss(stderr_file):
    with redirected(stderr_file), progress_bar("corpus: scans x 3 passes", 6) as advance:
        for i in range(1, 7):
            if i % 2:
                advance(1, loss=1.0 / i)  # with the latest metric
            else:
                advance(1)                # the old `advance(n)` contract
            wait_for_line(stderr_file, rf" {i}/6 \(")

    lines = lines_of(stderr_file)
    assert "\x1b" not in "".join(lines)  # no bar, no colour codes in a log file
    assert "corpus: scans x 3 passes  started at 0/6" in lines[0]
    ticks = [parsed(line) for line in lines[1:-1]]
    assert {t["stage"] for t in ticks} == {"corpus: scans x 3 passes"} and {t["total"] for t in ticks} == {"6"}
    assert [int(t["done"]) for t in ticks] == sorted(int(t["done"]) for t in ticks)  # counts only go up
    moving = [t for t in ticks if 0 < int(t["done"]) < 6]
    assert moving and all(t["rate"] != "-" and re.fullmatch(r"\d+:\d\d(:\d\d)?", t["eta"]) for t in moving)
    assert all(re.search(r"  loss \d", t["rest"]) for t in ticks if int(t["done"]) >= 1)  # the latest loss
    three = next(t for t in ticks if t["done"] == "3")
    assert "loss 0.3333" in three["rest"]  # the 3rd advance passed loss 1/3; the 4th passed none
    last = parsed(lines[-1])
    assert (last["done"], last["total"], last["eta"]) == ("6", "6", None) and "done in" in last["rest"]


def test_metric_set_alone_and_unknown_total(stderr_file):
    with redirected(stderr_file), progress_bar("eval: batches", None) as advance:
        advance(2)
        advance.set_metric(accuracy=0.75)
        wait_for_line(stderr_file, r"eval: batches  2  .*accuracy 0\.75")
    last = lines_of(stderr_file)[-1]
    assert "eval: batches  2  " in last and "ETA" not in last and "done in" in last


def test_step_reporter_counts_from_a_resumed_step_and_only_rank_0_prints(stderr_file):
    with redirected(stderr_file), StepReporter("tokenizer", total=8, start=4, rank=1) as silent:
        silent.update(5, loss=9.0)
    assert lines_of(stderr_file) == []

    with redirected(stderr_file), StepReporter("tokenizer", total=8, start=4) as reporter:
        for step in range(4, 8):
            reporter.update(step + 1, loss=2.0 / (step + 1))
            wait_for_line(stderr_file, rf"tokenizer  step {step + 1}/8 ")
    lines = lines_of(stderr_file)
    assert "tokenizer  started at step 4/8" in lines[0]
    six = parsed(next(line for line in lines if " step 6/8 " in line))
    assert six["unit"] == "step " and six["rate"] != "-" and six["eta"] and "loss 0.3333" in six["rest"]
    assert "step 8/8" in lines[-1] and "done in" in lines[-1]


def test_a_failing_loop_says_stopped(stderr_file):
    with redirected(stderr_file), pytest.raises(RuntimeError):
        with StepReporter("llm", total=10) as reporter:
            reporter.update(3, loss=1.5)
            raise RuntimeError("worker lost")
    last = lines_of(stderr_file)[-1]
    assert "llm  step 3/10" in last and "loss 1.5" in last and "stopped in" in last


def test_no_progress_takes_metrics_too():
    with no_progress("x", 3) as advance:
        advance()
        advance(2, loss=0.1)
        advance.set_metric(loss=0.2)


def test_interval_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.delenv("FMRILM_LOG_INTERVAL", raising=False)
    assert log_interval() == 30.0
    monkeypatch.setenv("FMRILM_LOG_INTERVAL", "2.5")
    assert log_interval() == 2.5
    monkeypatch.setenv("FMRILM_LOG_INTERVAL", "soon")
    assert log_interval() == 30.0
    assert "FMRILM_LOG_INTERVAL='soon' is not a number of seconds" in capsys.readouterr().err


# ---- the log flood ---------------------------------------------------------------------------------------

QUIET_CHILD = """
import logging, sys, warnings
from cluster.logs import quiet_third_party
print("quieted" if quiet_third_party() else "verbose", flush=True)
warnings.warn("old api", DeprecationWarning)
warnings.warn("new default soon", FutureWarning)
import numpy as np
np.nanmean(np.full((2, 3), np.nan), 0)
for _ in range(3):
    warnings.warn("a warning a user should see", UserWarning)
ds = logging.getLogger("DeepSpeed")
ds.addHandler(logging.StreamHandler(sys.stderr))
ds.setLevel(logging.INFO)  # as DeepSpeed does at import, after our set-up
ds.info("[Rank 0] step=10, skipped=0, lr=[1e-4]")
ds.warning("a DeepSpeed warning a user should see")
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="third-party bar"):
    pass
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_third_party_keeps_what_a_user_needs(tmp_path, verbose):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TQDM_DISABLE", "FMRILM_VERBOSE")}
    if verbose:
        env["FMRILM_VERBOSE"] = "1"
    with open(tmp_path / "err.log", "w") as err:
        out = subprocess.run([sys.executable, "-c", QUIET_CHILD], env=env, stdout=subprocess.PIPE, stderr=err,
                             text=True, cwd=Path(__file__).parents[1], check=True).stdout
    log = (tmp_path / "err.log").read_text()
    assert out.strip() == ("verbose" if verbose else "quieted")
    assert "a DeepSpeed warning a user should see" in log
    # numpy's all-NaN warnings are muted only around our own calls that expect them, never process-wide
    assert "Mean of empty slice" in log
    noise = ["old api", "new default soon", "step=10, skipped=0", "third-party bar"]
    if verbose:
        assert all(n in log for n in noise[1:]), log  # DeprecationWarning from __main__ shows by default
    else:
        assert not [n for n in noise if n in log], log
        assert log.count("a warning a user should see") == 1
