"""The pipeline: every stage of the registry in order, each as an MLflow child run of one parent run.

Stages are plain library calls (`corpus_builder.synth.synthesize`, ...) declared once in `fmrilm.stages`; the
pipeline only wires their inputs and outputs together (`fmrilm.runner`), writes the resolved config next to every
output and records lineage: each stage's run carries `fmrilm.input_run_id` = the run that produced its input.

Skip what is done. A stage that completes writes `stage.json` into its output folder: its *key* (a hash of the
config sections the stage depends on and of its inputs' identities: the key and the MLflow run id of the stage
run that produced each input), the run id that produced the output, its summary and timing. A later pipeline
over the same workdir skips a stage whose record is complete, has the same key and whose outputs are there
(the corpus also checks its source files: `finished_build`); the skipped stage still gets a child run under the
new parent, tagged `fmrilm.status=skipped` and `fmrilm.output_run_id` = the run that produced the output, and
the next stage's lineage names that producing run. A stage whose key changed starts fresh (its output folder
is cleared); one with the same key but no complete record was interrupted and continues: the corpus build
resumes its shards, a training stage its last checkpoint (which refuses a checkpoint of another config).
`--from STAGE` reruns that stage and every later one from scratch, `--only STAGE` just that one; the stages
before it are read from the workdir as they are.

Stages: synth (only without corpus sources) -> corpus -> tokenizer -> align -> instruct -> eval (the order of
`fmrilm.stages.REGISTRY`); then the config's ablation variants (`fmrilm.ablations`), each running the model stages
(those declared `variant`) on the same corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmrilm.ablations import run_ablations, variant_config
from fmrilm.config import PipelineConfig, flatten, save_resolved
from fmrilm.progress import no_progress
from fmrilm.runner import PipelineResult, StageRunner, run_stages, stage_modes, stage_names
from fmrilm.stage import Registry, StageResult
from fmrilm.stages import REGISTRY
from fmrilm.tracking import tracker_for


def _registry(registry: Registry | None) -> Registry:
    return REGISTRY if registry is None else registry


def run_pipeline(cfg: PipelineConfig, workdir: Path | None = None, progress=no_progress, *,
                 from_stage: str | None = None, only: str | None = None,
                 registry: Registry | None = None) -> PipelineResult:
    """Run the stages the config enables, in order, under one parent MLflow run; skip those done for the same
    config and inputs, continue an interrupted one. `from_stage` reruns that stage and the later ones from
    scratch, `only` just that one; earlier stages are read from the workdir. `registry`: the stages (default
    `fmrilm.stages.REGISTRY`)."""
    registry = _registry(registry)
    workdir = Path(workdir or cfg.workdir)
    modes = stage_modes(stage_names(cfg, registry), from_stage, only)
    for name, overrides in cfg.ablations.items():  # a bad variant fails now, not after the main model has trained
        variant_config(cfg, name, overrides)
    tracker = tracker_for(cfg, workdir)
    resolved = save_resolved(cfg, workdir)
    tags = {"fmrilm.from": from_stage} if from_stage else {"fmrilm.only": only} if only else {}
    with tracker.run("pipeline", params=flatten(cfg), tags=tags) as parent:
        parent.log_artifact(resolved)
        result = PipelineResult(workdir, tracker.uri, parent.run_id)
        runner = StageRunner(tracker, parent, result, modes, progress=progress)
        records, cfg = run_stages(runner, registry, cfg, workdir)
        if cfg.ablations and modes.get("eval", "omit") != "omit":
            run_ablations(cfg, workdir, records, result, tracker, parent, registry)

        (workdir / "pipeline.json").write_text(json.dumps(
            {"parent_run_id": parent.run_id, "tracking_uri": tracker.uri,
             "stages": [summary_row(s, registry) for s in result.stages]}, indent=2))
        parent.log_artifact(workdir / "pipeline.json")
    return result


def key_metric(stage: StageResult, registry: Registry | None = None) -> str:
    """The one figure that says how a stage went (its declared `metric`)."""
    registry = _registry(registry)
    name = stage.name.rsplit("/", 1)[-1]  # an ablation variant's stages are "<variant>/<stage>"
    return registry[name].metric(stage.summary) if name in registry else ""


def summary_row(stage: StageResult, registry: Registry | None = None) -> dict:
    status = stage.status
    if stage.status == "resumed" and stage.resumed_from is not None:
        status = f"resumed from step {stage.resumed_from}"
    elif stage.status == "reused" and stage.stale:
        status = "reused (other config)"
    return {"stage": stage.name, "status": status, "seconds": round(stage.seconds, 2),
            "metric": key_metric(stage, registry), "out": str(stage.out), "run_id": stage.run_id,
            "output_run_id": stage.output_run_id}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}:{sec:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def summary_table(result: PipelineResult, registry: Registry | None = None) -> str:
    """One line per stage: stage, what happened, time, key metric, output folder."""
    rows = [("stage", "status", "time", "key metric", "output")]
    rows += [(r["stage"], r["status"], _duration(r["seconds"]) if r["status"] != "reused" else "-", r["metric"],
              r["out"]) for r in (summary_row(s, registry) for s in result.stages)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths)), row[4]]).rstrip()
                     for row in rows)
