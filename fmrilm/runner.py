"""How stages are run, the same for every stage of the registry: key, skip, resume, reuse, record, tag.

`run_stages` takes stages in order (`fmrilm.stage.Stage`), each into `<root>/<its folder>`, through a `StageRunner`
that holds what one pipeline run shares (its tracker, its parent MLflow run, the mode of each stage and the results
so far). For each stage it resolves the inputs (the outputs earlier stages handed on), lets the stage `prepare` its
config, computes its key and then runs, skips, resumes or reuses it as `fmrilm.pipeline`'s module doc describes.
`fmrilm.pipeline` runs the registry's stages this way; `fmrilm.ablations` runs a variant's model stages the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fmrilm.config import PipelineConfig
from fmrilm.progress import no_progress
from fmrilm.stage import Registry, Stage, StageContext, StageResult, numbers
from fmrilm.tracking import StageRun, Tracker
from fmrilm_core.errors import InputError

RECORD = "stage.json"  # in a stage's output folder: written "running" when it starts, "complete" when it ends
STATUS_TAG = "fmrilm.status"  # ran | resumed | skipped
OUTPUT_RUN_TAG = "fmrilm.output_run_id"  # the run that produced the stage's output
KEY_TAG = "fmrilm.stage_key"


@dataclass
class PipelineResult:
    workdir: Path
    tracking_uri: str
    run_id: str | None
    stages: list[StageResult] = field(default_factory=list)


def stage_names(cfg: PipelineConfig, registry: Registry) -> list[str]:
    """The stages a config runs, in order (synth, say, only when the corpus has no sources of its own)."""
    return [stage.name for stage in registry if stage.applies(cfg)]


def stage_modes(names: list[str], from_stage: str | None = None, only: str | None = None) -> dict[str, str]:
    """What each stage does: "auto" (skip when done), "force" (rerun from scratch), "reuse" (read its output from
    the workdir as it is) or "omit"."""
    if from_stage and only:
        raise InputError("--from and --only exclude each other")
    chosen = from_stage or only
    if chosen is None:
        return dict.fromkeys(names, "auto")
    if chosen not in names:
        flag = "--from" if from_stage else "--only"
        raise InputError(f"{flag} {chosen}: not a stage of this config (stages: {', '.join(names)})")
    at = names.index(chosen)
    after = "force" if from_stage else "omit"
    return {name: "reuse" if i < at else "force" if i == at else after for i, name in enumerate(names)}


def stage_key(name: str, config: dict, inputs: dict[str, dict]) -> str:
    """16 hex characters naming what a stage's output depends on: its config sections and, for every input, the
    key and the MLflow run id of the stage run that produced it (a rerun input means new downstream work)."""
    content = {"stage": name, "config": config,
               "inputs": {k: {"key": r["key"], "run_id": r["run_id"]} for k, r in sorted(inputs.items())}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(out: Path) -> dict | None:
    """The `stage.json` of a stage's output folder, or None."""
    try:
        record = json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out / RECORD)  # atomic: a killed pipeline never leaves half a record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class StageRunner:
    """Runs, skips or reuses the stages of one pipeline run (or of one ablation variant: `prefix` "<variant>/") and
    collects their results in `result.stages`."""

    def __init__(self, tracker: Tracker, parent: StageRun, result: PipelineResult, modes: dict[str, str], *,
                 prefix: str = "", progress=no_progress):
        self.tracker, self.parent, self.result, self.modes = tracker, parent, result, modes
        self.prefix, self.progress = prefix, progress

    def __call__(self, stage: Stage, ctx: StageContext, config: dict, inputs: dict[str, dict], mode: str) -> dict:
        """One stage: `config` and `inputs` (the records of the stages it reads) make its key; returns the stage's
        record."""
        name, out, input_run_id = stage.name, ctx.out, ctx.input_run_id
        key = stage_key(name, config, inputs)
        record = read_record(out)
        if mode == "reuse":
            if record is None or record.get("status") != "complete":
                raise InputError(f"{out}: the {name} stage has not completed in this workdir (run the pipeline "
                                 "without --from / --only first)")
            self.result.stages.append(StageResult(self.prefix + name, out, None, record.get("summary", {}), "reused",
                                                  0.0, record["run_id"], stale=record.get("key") != key))
            return record

        started = time.monotonic()
        if (mode == "auto" and record is not None and record.get("status") == "complete"
                and record.get("key") == key and stage.done(ctx)):
            tags = {STATUS_TAG: "skipped", OUTPUT_RUN_TAG: record["run_id"], KEY_TAG: key}
            with self.tracker.run(name, parent=self.parent, input_run_id=input_run_id, tags=tags) as skipped:
                skipped.log_metrics(numbers(record.get("summary", {})))
            self.result.stages.append(StageResult(self.prefix + name, out, skipped.run_id, record.get("summary", {}),
                                                  "skipped", time.monotonic() - started, record["run_id"]))
            return record

        if mode == "force" or (record is not None and record.get("key") != key):
            shutil.rmtree(out, ignore_errors=True)  # another config (or a forced rerun): start from scratch
        resumed = stage.resume(ctx)
        begun = _now()
        identity = {k: {"key": r["key"], "run_id": r["run_id"], "out": r.get("out")} for k, r in inputs.items()}
        _write_record(out, {"stage": name, "status": "running", "key": key, "started": begun, "inputs": identity,
                            "input_run_id": input_run_id})
        result = stage.run(ctx)
        result.name = self.prefix + result.name
        result.seconds = time.monotonic() - started
        result.status = "resumed" if resumed not in (None, False) else "ran"
        result.resumed_from = resumed if isinstance(resumed, int) and not isinstance(resumed, bool) else None
        result.output_run_id = result.run_id
        done_run = StageRun(self.tracker.client, result.run_id) if result.run_id else StageRun(None, None)
        done_run.set_tag(STATUS_TAG, result.status)
        done_run.set_tag(KEY_TAG, key)
        record = {"stage": name, "status": "complete", "key": key, "run_id": result.run_id,
                  "input_run_id": input_run_id, "inputs": identity, "out": str(out), "started": begun,
                  "finished": _now(), "seconds": round(result.seconds, 3), "resumed_from_step": result.resumed_from,
                  "tracking_uri": self.tracker.uri, "config": config, "summary": result.summary}
        _write_record(out, record)
        self.result.stages.append(result)
        return record


def run_stages(runner: StageRunner, stages: Iterable[Stage], cfg: PipelineConfig, root: Path,
               records: dict[str, dict] | None = None, *, shared: dict[str, dict] | None = None
               ) -> tuple[dict[str, dict], PipelineConfig]:
    """Each of `stages` in order into `root`/<its folder>, as the runner's modes say (a stage without a mode, or
    omitted, is left out).
    `records`: the records of stages run before (name -> record). Returns every record, each with "output" (what
    the stage hands on), and the config the stages left (a stage's `configures`).
    `shared`: the main pipeline's records, for an ablation variant: a stage whose key equals the main one's (same
    config section, same inputs) is the main stage's output, read as it is instead of run again."""
    records = dict(records or {})
    for stage in stages:
        mode = runner.modes.get(stage.name, "omit")  # a stage this config does not run has no mode
        if mode == "omit":
            continue
        missing = [name for name in stage.inputs.values() if name not in records and name in runner.modes]
        if missing:
            raise InputError(f"the {stage.name} stage reads {', '.join(missing)}, which did not run before it")
        needs = {arg: name for arg, name in stage.inputs.items() if name in records}
        inputs = {name: records[name] for name in needs.values()}
        paths = {arg: Path(records[name]["output"]) for arg, name in needs.items()}
        lineage = list(needs.values())[-1] if needs else None
        ctx = StageContext(stage.name, stage.prepare(cfg, paths), stage.folder_in(root), paths, runner.tracker,
                           runner.parent, inputs[lineage]["run_id"] if lineage else None, runner.progress)
        config = stage.key(ctx.cfg)
        main = (shared or {}).get(stage.name)
        if main is not None and main["key"] == stage_key(stage.name, config, inputs):
            records[stage.name], out = main, Path(main["out"])  # the variant does not change this stage: the main
        else:                                                    # stage's output is its output
            records[stage.name], out = runner(stage, ctx, config, inputs, mode), ctx.out
            records[stage.name] |= {"output": stage.output(out)}
        cfg = stage.configures(cfg, out)
    return records, cfg
