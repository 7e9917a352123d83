"""The pipeline: every stage in order, each as an MLflow child run of one parent run.

Stages are plain library calls (`corpus_builder.synth.synthesize`, ...); this module only wires their
inputs and outputs together, writes the resolved config next to every output and records lineage: each
stage's run carries `fmrilm.input_run_id` = the run that produced its input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import PipelineConfig, flatten, save_resolved
from cluster.launch import mlflow_logger, run_training
from cluster.progress import no_progress
from cluster.tracking import StageRun, Tracker
from corpus_builder.build import build_corpus, finished_build
from corpus_builder.extraction import discover_all, extract_all
from corpus_builder.synth import synthesize
from corpus_builder.synth_nifti import atlas_config, write_nifti_cohort


@dataclass
class StageResult:
    name: str
    out: Path
    run_id: str | None
    summary: dict = field(default_factory=dict)


@dataclass
class PipelineResult:
    workdir: Path
    tracking_uri: str
    run_id: str | None
    stages: list[StageResult] = field(default_factory=list)


def tracker_for(cfg: PipelineConfig, workdir: Path) -> Tracker:
    """The run store of a config: `tracking.uri`, else $MLFLOW_TRACKING_URI, else <workdir>/mlflow.db (single
    commands use the config's workdir too, so every stage of a project lands in one store)."""
    return Tracker.for_workdir(workdir, cfg.tracking.experiment or cfg.name, cfg.tracking.uri)


def run_synth(cfg: PipelineConfig, out: Path, tracker: Tracker, parent: StageRun | None = None,
              progress=no_progress) -> StageResult:
    """Stage: write a synthetic cohort (tables layout) into `out`."""
    with tracker.run("synth", parent=parent, params=flatten(cfg.synth)) as run:
        resolved = save_resolved(cfg, out)
        write = write_nifti_cohort if cfg.synth.format == "nifti" else synthesize
        with progress("synth: scans", cfg.synth.subjects * cfg.synth.sessions) as advance:
            participants = write(cfg.synth, out, progress=advance)
        counts = participants["dataset"].value_counts().to_dict()
        run.log_metrics({"subjects": len(participants), "scans": len(participants) * cfg.synth.sessions,
                         **{f"subjects.{k}": v for k, v in counts.items()}})
        # synth.json documents the planted effects; participants.tsv stays out of MLflow (it holds ids)
        run.log_artifact(out / "synth.json")
        run.log_artifact(resolved)
        return StageResult("synth", out, run.run_id)


def run_timeseries(cfg: PipelineConfig, specs: list[str], out: Path, tracker: Tracker,
                   parent: StageRun | None = None, input_run_id: str | None = None,
                   progress=no_progress) -> StageResult:
    """Stage: every scan of the sources -> clean [T, N] series at TR 2.0 s (`corpus_builder.extraction`)."""
    params = {"sources.count": len(specs), **flatten(cfg.corpus.source, "source.")}
    records = discover_all(specs, cfg.corpus.source)  # bad sources fail before a run is opened
    with tracker.run("timeseries", parent=parent, params=params, input_run_id=input_run_id) as run:
        resolved = save_resolved(cfg, out)
        with progress("timeseries: scans", len(records)) as advance:
            summary = extract_all(records, cfg.corpus.source, out, progress=advance)
        run.log_metrics({k: summary[k] for k in ("scans", "ok", "failed", "seconds", "scans_per_s")})
        for artifact in ("summary.json", "rois.tsv"):
            run.log_artifact(out / artifact)
        run.log_artifact(resolved)
        return StageResult("timeseries", out, run.run_id, summary)


def run_corpus_build(cfg: PipelineConfig, specs: list[str], out: Path, tracker: Tracker,
                     parent: StageRun | None = None, input_run_id: str | None = None, overwrite: bool = False,
                     ray_address: str | None = None, progress=no_progress) -> StageResult:
    """Stage: sources -> sharded corpus (webdataset tars, zarr, manifest, norms) as Ray tasks."""
    # a finished corpus of the same inputs is taken as it is: no source discovery, no Ray, no progress bar
    summary = finished_build(specs, cfg.corpus, out, cfg.seed)
    if summary is None:
        records = discover_all(specs, cfg.corpus.source)  # bad sources fail before a run is opened
    with tracker.run("corpus", parent=parent, params=flatten(cfg.corpus), input_run_id=input_run_id) as run:
        if summary is None:
            with progress("corpus: scans x 3 passes", 3 * len(records)) as advance:
                summary = build_corpus(specs, cfg.corpus, out, cfg.seed, overwrite, advance, ray_address, records)
        resolved = save_resolved(cfg, out)
        run.log_metrics({k: summary[k] for k in ("scans", "ok", "failed", "shards", "seconds", "scans_per_s")}
                        | {f"split.{k}": v for k, v in summary["splits"].items()})
        run.log_params({f"failed_by_reason.{i}": f"{n} x {reason}"
                        for i, (reason, n) in enumerate(sorted(summary["failed_by_reason"].items()))})
        for artifact in ("norms.json", "summary.json", "rois.tsv", "reference.npz"):
            run.log_artifact(out / artifact)
        run.log_artifact(resolved)
        return StageResult("corpus", out, run.run_id, summary)


def with_corpus_sizes(cfg: PipelineConfig, corpus: Path) -> PipelineConfig:
    """The config with the sizes that follow from the data taken from the corpus (N ROIs, T volumes), not from a
    second copy in the config: a cohort of another atlas runs through the same config."""
    from corpus_builder.readers import open_zarr

    _, length, n_rois = open_zarr(corpus).shape
    model = cfg.tokenizer.model
    if (model.n_rois, model.length) == (n_rois, length):
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.tokenizer.model = model.model_copy(update={"n_rois": n_rois, "length": length})
    return cfg


def run_tokenizer_train(cfg: PipelineConfig, corpus: Path, out: Path, tracker: Tracker,
                        parent: StageRun | None = None, input_run_id: str | None = None) -> StageResult:
    """Stage 1: the text-aligned brain tokenizer (DeepSpeed; in-process or `workers` Ray Train workers)."""
    from tokenizer_train.train import TokenizerInputs, train

    cfg = with_corpus_sizes(cfg, corpus)
    params = {**flatten(cfg.tokenizer), "workers": cfg.workers}
    with tracker.run("tokenizer", parent=parent, params=params, input_run_id=input_run_id) as run:
        resolved = save_resolved(cfg, out)
        metrics = run_training(train, cfg.tokenizer, TokenizerInputs(corpus, out), workers=cfg.workers,
                               log_fn=mlflow_logger(tracker, run.run_id), storage=out / "ray", name="tokenizer")
        summary = {k.removeprefix("val/"): v for k, v in metrics.items()}
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        run.log_artifact(out / "tokenizer")
        run.log_artifact(out / "metrics.json")
        run.log_artifact(resolved)
        return StageResult("tokenizer", out, run.run_id, summary)


def run_llm_align(cfg: PipelineConfig, corpus: Path, tokenizer: Path, out: Path, tracker: Tracker,
                  parent: StageRun | None = None, input_run_id: str | None = None) -> StageResult:
    """Stage 2: the LLM learns to read and predict brain tokens (F2F, F2T, T2T; DeepSpeed, in-process or Ray
    Train). `tokenizer` is the exported stage-1 folder; N, T and the codebook come from it and the corpus."""
    from llm_train.train import AlignInputs, train

    params = {**flatten(cfg.align), "workers": cfg.workers}
    with tracker.run("align", parent=parent, params=params, input_run_id=input_run_id) as run:
        save_resolved(cfg, out)  # logged below with the rest of the folder
        metrics = run_training(train, cfg.align, AlignInputs(corpus, tokenizer, out), workers=cfg.workers,
                               log_fn=mlflow_logger(tracker, run.run_id), storage=out / "ray", name="align")
        summary = {k.removeprefix("val/"): v for k, v in metrics.items()}
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        for item in sorted(out.iterdir()):  # the model folder, less checkpoints, Ray's storage and a GGUF base copy
            if item.name not in {"checkpoints", "ray", "base"}:
                run.log_artifact(item)
        return StageResult("align", out, run.run_id, summary)


def run_pipeline(cfg: PipelineConfig, workdir: Path | None = None, progress=no_progress) -> PipelineResult:
    """Run every stage that the config enables, in order, under one parent MLflow run."""
    workdir = Path(workdir or cfg.workdir)
    tracker = tracker_for(cfg, workdir)
    resolved = save_resolved(cfg, workdir)
    with tracker.run("pipeline", params=flatten(cfg)) as parent:
        parent.log_artifact(resolved)
        result = PipelineResult(workdir, tracker.uri, parent.run_id)
        specs, input_run = list(cfg.corpus.sources), None
        if not specs:
            synth = run_synth(cfg, workdir / "source", tracker, parent, progress)
            result.stages.append(synth)
            specs, input_run = [str(synth.out)], synth.run_id
            if cfg.synth.format == "nifti":  # the synthetic cohort brings its own atlas
                cfg = cfg.model_copy(deep=True)
                cfg.corpus.source.atlas = atlas_config(synth.out)
            elif cfg.synth.n_rois is not None:  # a coarser synthetic atlas: the corpus expects its ROI count
                cfg = cfg.model_copy(deep=True)
                cfg.corpus.source.atlas.n_rois = cfg.synth.n_rois
        corpus = run_corpus_build(cfg, specs, workdir / "corpus", tracker, parent, input_run, overwrite=True,
                                  progress=progress)
        result.stages.append(corpus)
        tokenizer = run_tokenizer_train(cfg, corpus.out, workdir / "tokenizer", tracker, parent, corpus.run_id)
        result.stages.append(tokenizer)
        result.stages.append(run_llm_align(cfg, corpus.out, tokenizer.out / "tokenizer", workdir / "align", tracker,
                                           parent, tokenizer.run_id))
        summary = {s.name: {"out": str(s.out), "run_id": s.run_id} for s in result.stages}
        (workdir / "pipeline.json").write_text(json.dumps(summary, indent=2))
        parent.log_artifact(workdir / "pipeline.json")
    return result
