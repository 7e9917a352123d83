"""The stage contract: what a stage *is*, declared once as a `Stage`; how stages are *run* (skipped, resumed,
tracked, chosen with --from / --only) is `fmrilm.pipeline`'s, the same for every stage.

A stage declares:
- `name`, and `folder`, its output folder under the workdir (default: the name);
- `inputs`: argument -> the earlier stage whose handed-on output fills it, in order; the last one is its lineage
  (the run its `fmrilm.input_run_id` tag names). An input whose stage this config does not run is left out (the
  corpus reads the synthetic cohort only when there is one);
- `key(cfg)`: the config sections it depends on; with its inputs' identities they make its key (same key, same
  output: the stage is skipped);
- `run(ctx)`: does the work inside its own MLflow run (`ctx.tracker.run(...)`) and returns a `StageResult` whose
  summary holds its figures;
- `done(ctx)`: whether its output folder holds what it hands on;
- `output(out)`: what it hands to later stages (its folder, or a path inside it);
- `metric(summary)`: its headline figure, one short string for the summary table;
- optionally `resume(ctx)` (the step, or True, an interrupted run continues from; None: it starts over),
  `applies(cfg)` (whether this config runs it at all), `prepare(cfg, inputs)` (the config as the stage sees it,
  e.g. sizes read from the corpus), `configures(cfg, out)` (the config the later stages see once it is done) and
  `variant` (an ablation variant reruns it: the model stages).

`Registry` holds stages in pipeline order; `fmrilm.stages.REGISTRY` is the built-in one. `run_stage` runs one
stage by itself (a single command, a benchmark): its `prepare`, then its `run`, with no skip record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fmrilm.config import PipelineConfig
from fmrilm.progress import no_progress

if TYPE_CHECKING:
    from fmrilm.tracking import StageRun, Tracker


@dataclass
class StageResult:
    name: str
    out: Path
    run_id: str | None  # the run of this pipeline's stage (for a skipped stage: its "skipped" record)
    summary: dict = field(default_factory=dict)
    status: str = "ran"  # ran | resumed | skipped | reused (read from the workdir under --from / --only)
    seconds: float = 0.0
    output_run_id: str | None = None  # the run that produced the output (a skipped stage's earlier run)
    resumed_from: int | None = None  # the checkpoint step an interrupted training stage continued from
    stale: bool = False  # reused, but recorded for another config than the current one


@dataclass
class StageContext:
    """What a stage's `run`, `done` and `resume` are handed."""

    name: str
    cfg: PipelineConfig  # as the stage sees it (after its `prepare`)
    out: Path  # its output folder
    inputs: dict[str, Path]  # argument -> the output an earlier stage handed on
    tracker: Tracker
    parent: StageRun | None = None  # the pipeline's run (None: a single command)
    input_run_id: str | None = None  # the run that produced its lineage input
    progress: Callable = no_progress  # `progress(description, total)`: a context giving `advance(n)`

    def run(self, params: Mapping[str, object] | None = None):
        """The stage's MLflow run: a child of the pipeline's, tagged with its lineage input."""
        return self.tracker.run(self.name, parent=self.parent, params=params, input_run_id=self.input_run_id)


def _same(out: Path) -> Path:
    return out


def _nothing(summary: dict) -> str:
    return ""


def _never(ctx: StageContext) -> None:
    return None


def _always(cfg: PipelineConfig) -> bool:
    return True


def _as_is(cfg: PipelineConfig, *_) -> PipelineConfig:
    return cfg


@dataclass(frozen=True)
class Stage:
    """One stage, declared once (see the module doc)."""

    name: str
    key: Callable[[PipelineConfig], dict]
    run: Callable[[StageContext], StageResult]
    done: Callable[[StageContext], bool]
    inputs: Mapping[str, str] = field(default_factory=dict)
    output: Callable[[Path], Path] = _same
    metric: Callable[[dict], str] = _nothing
    resume: Callable[[StageContext], int | bool | None] = _never
    applies: Callable[[PipelineConfig], bool] = _always
    prepare: Callable[[PipelineConfig, Mapping[str, Path]], PipelineConfig] = _as_is
    configures: Callable[[PipelineConfig, Path], PipelineConfig] = _as_is
    variant: bool = False
    folder: str | None = None

    @property
    def lineage(self) -> str | None:
        """The stage whose run its lineage tag names: the last input."""
        return list(self.inputs.values())[-1] if self.inputs else None

    def folder_in(self, root: Path) -> Path:
        """Its output folder under a workdir (or an ablation variant's folder)."""
        return Path(root) / (self.folder or self.name)


class Registry:
    """Stages in pipeline order; a stage comes after every stage it reads."""

    def __init__(self, stages: list[Stage] | tuple[Stage, ...] = ()):
        self._stages: list[Stage] = []
        for stage in stages:
            self.add(stage)

    def add(self, stage: Stage, *, after: str | None = None) -> Stage:
        """Register `stage` at the end, or right after the stage `after`; returns it."""
        if stage.name in self:
            raise ValueError(f"stage {stage.name!r} is registered already")
        at = len(self._stages) if after is None else self._stages.index(self[after]) + 1
        missing = [name for name in stage.inputs.values() if name not in self.names()[:at]]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {', '.join(missing)}: register it after them")
        self._stages.insert(at, stage)
        return stage

    def remove(self, name: str) -> Stage:
        stage = self[name]
        readers = [s.name for s in self._stages if name in s.inputs.values()]
        if readers:
            raise ValueError(f"stage {name!r} is read by {', '.join(readers)}")
        self._stages.remove(stage)
        return stage

    @contextmanager
    def added(self, stage: Stage, *, after: str | None = None) -> Iterator[Stage]:
        """`stage` registered for the duration of the block (a plug-in, a test)."""
        self.add(stage, after=after)
        try:
            yield stage
        finally:
            self.remove(stage.name)

    def names(self) -> list[str]:
        return [s.name for s in self._stages]

    def __getitem__(self, name: str) -> Stage:
        for stage in self._stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} (stages: {', '.join(self.names())})")

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self._stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(list(self._stages))

    def __len__(self) -> int:
        return len(self._stages)


def numbers(summary: dict) -> dict[str, float]:
    """The numeric entries of a summary, as MLflow metrics."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_stage(stage: Stage, cfg: PipelineConfig, out: Path, tracker: Tracker, inputs: Mapping[str, Path], *,
              parent: StageRun | None = None, input_run_id: str | None = None, progress=no_progress) -> StageResult:
    """One stage by itself into `out`, its inputs given as paths (argument -> path): its `prepare`, then its `run`
    (its own MLflow run; no skip record, no key: what a single command does)."""
    unknown = sorted(set(inputs) - set(stage.inputs))
    if unknown:
        raise TypeError(f"stage {stage.name!r} takes no input {', '.join(unknown)} (inputs: {', '.join(stage.inputs)})")
    inputs = {name: Path(path) for name, path in inputs.items()}
    ctx = StageContext(stage.name, stage.prepare(cfg, inputs), Path(out), inputs, tracker, parent, input_run_id,
                       progress)
    return stage.run(ctx)
