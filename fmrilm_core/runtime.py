"""What a training stage needs from whoever runs it (docs/design.md): rank, logging, checkpoint storage.

Every training stage takes a `Runtime`; `cluster` hands one in for in-process, torchrun and Ray Train runs (the
last backed by `ray.train.report` / `ray.train.get_checkpoint`, built on `LocalRuntime`); tests can use
`LocalRuntime` directly.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "complete"  # marker file: a checkpoint directory without it was interrupted mid-save


class Runtime(Protocol):
    rank: int
    world_size: int

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def checkpoint_dir(self, step: int) -> Path:
        """Where every rank writes its part of the checkpoint of `step` (a shared directory)."""

    def commit_checkpoint(self, directory: Path, step: int, metrics: dict[str, float]) -> None:
        """Called on every rank after all ranks saved into `directory`."""

    def latest_checkpoint(self) -> Path | None: ...

    def progress(self, stage: str, total: int, start: int) -> StepProgress:
        """A reporter of the loop's progress: `with runtime.progress(...) as p: p.update(step_done, loss=...)`."""


class StepProgress(Protocol):
    def update(self, step: int, **metrics) -> None: ...

    def __enter__(self) -> StepProgress: ...

    def __exit__(self, *exc) -> None: ...


class _Silent:
    """The progress reporter of a runtime nobody watches."""

    def update(self, step: int, **metrics) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass


class LocalRuntime:
    """Checkpoints in `root/step_NNNNNN/`, kept `keep` deep; logs through `log_fn` on rank 0 only; loop progress
    through `progress_fn(stage, total, start, rank)` (e.g. fmrilm.progress's StepReporter), silent without one."""

    def __init__(self, root: Path, log_fn: Callable[[dict[str, float], int], None] | None = None, keep: int = 2,
                 progress_fn: Callable[[str, int, int, int], StepProgress] | None = None):
        self.root = Path(root)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.log_fn = log_fn
        self.keep = keep
        self.progress_fn = progress_fn

    def progress(self, stage: str, total: int, start: int) -> StepProgress:
        if self.progress_fn is None:
            return _Silent()
        return self.progress_fn(stage, total, start, self.rank)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0 and self.log_fn is not None:
            self.log_fn(metrics, step)

    def checkpoint_dir(self, step: int) -> Path:
        path = self.root / f"step_{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit_checkpoint(self, directory: Path, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        (directory / COMPLETE).write_text(str(step))
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        done = self._complete()
        return done[-1] if done else None

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))
                 and (p / COMPLETE).exists()]
        return [p for _, p in sorted(found)]
