"""Progress of long work: a rich bar on a terminal, plain log lines everywhere else.

Library code gets a plain `advance(n)` callback (`progress_bar`); training loops get a `StepReporter` (made by
`step_reporter`, the `progress_fn` a runtime is handed).
Off a terminal (Ray Jobs, SLURM output files, `> log`) a bar would print nothing until the end, so there
one plain line goes to stderr every FMRILM_LOG_INTERVAL seconds (default 30), from a background thread, so a
slow shard or step still shows the run is alive:

    12:04:31 corpus: scans x 3 passes  120/720 (17%)  3.2/s  elapsed 0:37  ETA 3:07  loss 0.4312

and one closing line when the work ends. The rate is over the time since the last line that saw progress (so
the ETA follows a run that speeds up or slows down); the metrics are the latest ones the caller passed.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

INTERVAL_ENV = "FMRILM_LOG_INTERVAL"
DEFAULT_INTERVAL = 30.0


def log_interval() -> float:
    """Seconds between plain progress lines: $FMRILM_LOG_INTERVAL, else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        print(f"warning: {INTERVAL_ENV}={raw!r} is not a number of seconds; using {DEFAULT_INTERVAL:g}",
              file=sys.stderr)
        return DEFAULT_INTERVAL
    return value


def on_terminal() -> bool:
    """Whether stderr is a terminal (rich's view: FORCE_TERMINAL / TTY_COMPATIBLE are honoured)."""
    return Console(stderr=True).is_terminal


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _rate(per_s: float) -> str:
    if per_s >= 10:
        return f"{per_s:.0f}/s"
    if per_s >= 0.1:
        return f"{per_s:.2f}/s"
    return f"{per_s * 60:.2f}/min" if per_s > 0 else "-/s"


def _metric(value) -> str:
    """Format a metric late: a torch tensor is only synchronised when a line is printed."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class PlainProgress:
    """Counts work and prints a plain line to stderr every `interval` seconds (from a daemon thread) and when
    closed. Thread-safe: `advance` may be called from the work's thread while the ticker prints."""

    def __init__(self, description: str, total: int | None, interval: float | None = None, start: int = 0,
                 unit: str = ""):
        self.description = description
        self.total = total
        self.interval = log_interval() if interval is None else interval
        self.unit = unit
        self.done = start
        self.metrics: dict[str, object] = {}
        self._lock = threading.Lock()
        self._started = self._mark_time = time.monotonic()
        self._start_count = self._mark_count = start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the work calls --
    def advance(self, n: int = 1, **metrics) -> None:
        with self._lock:
            self.done += n
            self.metrics.update(metrics)

    def update(self, done: int, **metrics) -> None:
        with self._lock:
            self.done = done
            self.metrics.update(metrics)

    def set_metric(self, **metrics) -> None:
        with self._lock:
            self.metrics.update(metrics)

    # -- lifecycle --
    def start(self) -> PlainProgress:
        total = f"/{self.total}" if self.total is not None else ""
        self._emit(f"{self.description}  started at {self.unit}{self.done}{total}")
        self._thread = threading.Thread(target=self._tick, name=f"progress: {self.description}", daemon=True)
        self._thread.start()
        return self

    def close(self, failed: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            elapsed = time.monotonic() - self._started
            rate = (self.done - self._start_count) / elapsed if elapsed > 0 else 0.0
            line = self._line_locked(rate, eta=None, final=True)
        word = "stopped" if failed else "done"
        self._emit(f"{line}  {word} in {_clock(elapsed)}")

    def _tick(self) -> None:
        # Event.wait returns True once closed; an interval of 0 still yields the CPU between lines
        while not self._stop.wait(max(self.interval, 0.001)):
            self._emit(self.line())

    def line(self) -> str:
        """The progress line now; the rate is over the time since the last line that saw progress (a slow
        shard spanning several lines is measured over all of them), before any progress over the whole run."""
        with self._lock:
            now = time.monotonic()
            window, count = now - self._mark_time, self.done - self._mark_count
            if count <= 0:
                window, count = now - self._started, self.done - self._start_count
            else:
                self._mark_time, self._mark_count = now, self.done
            rate = count / window if window > 0 else 0.0
            left = None if self.total is None else max(self.total - self.done, 0)
            eta = left / rate if left is not None and rate > 0 else None
            return self._line_locked(rate, eta, now)

    def _line_locked(self, rate: float, eta: float | None, now: float | None = None, final: bool = False) -> str:
        now = time.monotonic() if now is None else now
        parts = [self.description]
        if self.total:
            parts.append(f"{self.unit}{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(f"{self.unit}{self.done}")
        parts.append(_rate(rate))
        parts.append(f"elapsed {_clock(now - self._started)}")
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        elif self.total is not None and self.done < self.total and not final:
            parts.append("ETA ?")
        parts += [f"{k} {_metric(v)}" for k, v in self.metrics.items()]
        return "  ".join(parts)

    @staticmethod
    def _emit(line: str) -> None:
        # sys.stderr looked up at each call: redirections made after start-up (pytest, tee) are honoured
        print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class RateColumn(ProgressColumn):
    """Items per second (scans/s for the corpus build)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "-/s", style="progress.data.speed")


class MetricColumn(ProgressColumn):
    """The latest metrics the work passed (e.g. `loss 0.431`)."""

    def render(self, task) -> Text:
        metrics = task.fields.get("metrics") or {}
        return Text("  ".join(f"{k} {_metric(v)}" for k, v in metrics.items()), style="progress.data.speed")


class Advance:
    """The callback handed to library code: `advance(n)` (the old contract), `advance(n, loss=x)` to pass the
    latest metrics with it, or `advance.set_metric(loss=x)` alone."""

    def __init__(self, advance, set_metric):
        self._advance, self._set_metric = advance, set_metric

    def __call__(self, n: int = 1, **metrics) -> None:
        self._advance(n, metrics)

    def set_metric(self, **metrics) -> None:
        self._set_metric(metrics)


@contextmanager
def progress_bar(description: str, total: int | None, interval: float | None = None) -> Iterator[Advance]:
    """Progress on stderr: a rich bar on a terminal, else plain lines every `interval` seconds
    (default $FMRILM_LOG_INTERVAL or 30). Yields an `Advance` callback."""
    if on_terminal():
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), MetricColumn()]
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(description, total=total, metrics={})
            metrics: dict = {}

            def advance(n, new):
                metrics.update(new)
                bar.update(task, advance=n, metrics=metrics)

            def set_metric(new):
                metrics.update(new)
                bar.update(task, metrics=metrics)

            yield Advance(advance, set_metric)
        return
    plain = PlainProgress(description, total, interval).start()
    failed = True
    try:
        yield Advance(lambda n, new: plain.advance(n, **new), lambda new: plain.set_metric(**new))
        failed = False
    finally:
        plain.close(failed)


@contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Advance]:
    yield Advance(lambda n, new: None, lambda new: None)


class StepReporter:
    """Progress of a training loop, for the runtime a stage is handed (the stage libraries never import
    `fmrilm`; the runtime creates one through `step_reporter` and forwards to it).

        reporter = StepReporter("tokenizer", total=cfg.steps, start=start, rank=runtime.rank)
        for step in range(start, cfg.steps):
            losses = train_step(...)
            reporter.update(step + 1, loss=losses["loss"])   # steps done so far; a tensor is fine
        reporter.close()

    `update` only stores the number and a reference to the metric, so it costs nothing per step and a GPU
    tensor is read (synchronised) only when a line is printed. Only rank 0 reports. On a terminal it draws a
    rich bar; off a terminal it prints a plain line every FMRILM_LOG_INTERVAL seconds and one at the end.
    Also a context manager (closes itself, saying "stopped" when the loop raised).
    """

    def __init__(self, stage: str, total: int | None, start: int = 0, rank: int = 0,
                 interval: float | None = None, terminal: bool | None = None):
        self.stage, self.total, self.start = stage, total, start
        self._plain: PlainProgress | None = None
        self._bar: Progress | None = None
        self._metrics: dict = {}
        self._closed = rank != 0
        if self._closed:
            return
        if on_terminal() if terminal is None else terminal:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), MetricColumn()]
            self._bar = Progress(*columns, console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(stage, total=total, completed=start, metrics=self._metrics)
        else:
            self._plain = PlainProgress(stage, total, interval, start=start, unit="step ").start()

    def update(self, step: int, **metrics) -> None:
        """`step` = steps done so far (absolute, counting steps done before a resume)."""
        if self._closed:
            return
        # a tensor is kept detached (holding it must not keep its autograd graph alive) and read only when printed
        metrics = {k: v.detach() if hasattr(v, "detach") else v for k, v in metrics.items()}
        if self._plain is not None:
            self._plain.update(step, **metrics)
        else:
            self._metrics.update(metrics)
            self._bar.update(self._task, completed=step, metrics=self._metrics)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._plain is not None:
            self._plain.close(failed)
        else:
            self._bar.stop()

    def __enter__(self) -> StepReporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def step_reporter(stage: str, total: int, start: int, rank: int) -> StepReporter:
    """The `progress_fn(stage, total, start, rank)` of a training runtime (`cluster.launch.run_training`): a
    module-level function, so it travels to Ray Train workers."""
    return StepReporter(stage, total=total, start=start, rank=rank)
