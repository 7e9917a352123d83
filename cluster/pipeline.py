"""The pipeline: every stage in order, each as an MLflow child run of one parent run.

Stages are plain library calls (`corpus_builder.synth.synthesize`, ...); this module only wires their
inputs and outputs together, writes the resolved config next to every output and records lineage: each
stage's run carries `fmrilm.input_run_id` = the run that produced its input.

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

Stages: synth (only without corpus sources) -> corpus -> tokenizer -> align -> instruct -> eval; then the config's
ablation variants (`cluster.ablations`), each running the four model stages on the same corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cluster.config import PipelineConfig, flatten, save_resolved
from cluster.launch import mlflow_logger, run_training
from cluster.progress import no_progress
from cluster.tracking import StageRun, Tracker
from corpus_builder.build import build_corpus, finished_build
from corpus_builder.build import config_fingerprint as corpus_fingerprint
from corpus_builder.extraction import discover_all, extract_all
from corpus_builder.synth import synthesize
from corpus_builder.synth_nifti import atlas_config, write_nifti_cohort
from fmrilm_core.checkpoint import CLIENT_STATE
from fmrilm_core.errors import InputError
from fmrilm_core.runtime import COMPLETE


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
        return StageResult("synth", out, run.run_id,
                           {"subjects": len(participants), "scans": len(participants) * cfg.synth.sessions})


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


def run_llm_instruct(cfg: PipelineConfig, model: Path, corpus: Path, out: Path, tracker: Tracker,
                     parent: StageRun | None = None, input_run_id: str | None = None) -> StageResult:
    """Stage 3: instruction-tune the stage-2 folder `model` on the corpus's qa.json items into `out` (DeepSpeed,
    in-process or Ray Train), the model folder logged as artifacts."""
    from llm_train.instruct import InstructInputs, train

    params = {**flatten(cfg.instruct), "workers": cfg.workers}
    with tracker.run("instruct", parent=parent, params=params, input_run_id=input_run_id) as run:
        save_resolved(cfg, out)
        metrics = run_training(train, cfg.instruct, InstructInputs(model, corpus, out), workers=cfg.workers,
                               log_fn=mlflow_logger(tracker, run.run_id), storage=out / "ray", name="instruct")
        summary = {k.removeprefix("val/"): v for k, v in metrics.items()}
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        for item in sorted(out.iterdir()):
            if item.name not in {"checkpoints", "ray"}:
                run.log_artifact(item)
        return StageResult("instruct", out, run.run_id, summary)


def run_eval(cfg: PipelineConfig, model: Path, corpus: Path, out: Path, tracker: Tracker,
             parent: StageRun | None = None, input_run_id: str | None = None, *, external: bool = False,
             resume: bool = False) -> StageResult:
    """The eval stage: the model folder `model` on the test split of `corpus`, as the config's `eval` section says
    (the `train_n` / `tuned` fine-tuning with its `instruct` section: `eval.finetune_steps` steps for `train_n`,
    `eval.tuned_epochs` epochs for `tuned`, on `workers` Ray Train workers when there are any; `external`: every scan
    of a cohort that shares no subject with the model's lineage; `resume`: refuse a stale fine-tuning instead of
    redoing it), into `out`
    (metrics.json, predictions.json, eval.json, report.html) inside an MLflow run with the figures as metrics
    `<task>/<protocol>/<metric>` (also the summary) and the files as artifacts."""
    from cluster.launch import step_reporter
    from evaluation.task_eval import evaluate_tasks

    ev = cfg.eval
    tune = cfg.instruct
    if ev.finetune_steps is not None:
        tune = tune.model_copy(update={"steps": ev.finetune_steps, "checkpoint_every": ev.finetune_steps,
                                       "eval_every": ev.finetune_steps})

    def on_workers(train_fn, tune_cfg, inputs, name: str) -> dict:
        """A fine-tuning on Ray Train workers like every other training, its storage in the fine-tuning's folder."""
        return run_training(train_fn, tune_cfg, inputs, workers=cfg.workers, log_fn=None,
                            storage=Path(inputs.out) / "ray", name=name)

    params = {**flatten(ev), "model": str(model), "corpus": str(corpus), "seed": cfg.seed, "external": external}
    with tracker.run("eval", parent=parent, params=params, input_run_id=input_run_id) as run:
        metrics = evaluate_tasks(model, corpus, out, tasks=ev.tasks, shots=tuple(ev.shots), seed=cfg.seed,
                                 max_test=ev.max_test, examples=ev.examples, train_n=tuple(ev.train_n),
                                 tuned=ev.tuned, tuned_epochs=ev.tuned_epochs, instruct_cfg=tune,
                                 progress_fn=step_reporter, external=external, resume=resume,
                                 regression=ev.regression_decoding, temperature=ev.temperature_scaling,
                                 # workers 0: evaluate_tasks' own in-process run, its steps named after the task
                                 train_runner=on_workers if cfg.workers > 0 else None)
        summary = flat_metrics(metrics)
        run.log_metrics({k: v for k, v in summary.items() if math.isfinite(v)})
        for name in ("metrics.json", "predictions.json", "eval.json", "report.html"):
            if (Path(out) / name).is_file():
                run.log_artifact(Path(out) / name)
        return StageResult("eval", Path(out), run.run_id, summary)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json (task -> protocol -> figures) as MLflow numbers: `<task>/<protocol>/<metric>`, its 95 % interval
    as `<metric>_ci_lo` / `<metric>_ci_hi`, its difference from the FC baseline as `<metric>_vs_fc` (interval
    `<metric>_vs_fc_ci_lo` / `_ci_hi`). Anything else (a skipped task's reason, the chosen regularisation, the
    bootstrap's settings, an undefined interval) is left out rather than failing the stage."""
    out: dict[str, float] = {}
    for task, entry in metrics.items():
        if not isinstance(entry, dict):
            continue
        for protocol, figures in entry.items():
            if not isinstance(figures, dict) or protocol == "bootstrap":
                continue
            prefix = f"{task}/{protocol}/"
            out.update({prefix + k: v for k, v in _numbers(figures).items()})
            for name, ci in (figures.get("ci") or {}).items() if isinstance(figures.get("ci"), dict) else ():
                out.update({prefix + name + k: v for k, v in _interval(ci).items()})
            versus = figures.get("vs_fc_baseline")
            for name, d in versus.items() if isinstance(versus, dict) else ():
                if isinstance(d, dict):
                    out.update({prefix + f"{name}_vs_fc": v for v in _numbers({"d": d.get("diff")}).values()})
                    out.update({prefix + f"{name}_vs_fc" + k: v for k, v in _interval(d.get("ci")).items()})
    return out


def _interval(ci) -> dict[str, float]:
    """{"_ci_lo": lo, "_ci_hi": hi} of a [lo, hi] interval; {} of anything else (None: undefined)."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return {k: v for k, v in zip(("_ci_lo", "_ci_hi"), (_numbers({"v": c}).get("v") for c in ci)) if v is not None}
    return {}


# ---- the pipeline: skip what is done, resume what was interrupted --------------------------------------

STAGES = ("synth", "corpus", "tokenizer", "align", "instruct", "eval")
MODEL_STAGES = STAGES[2:]  # what an ablation variant reruns on the same corpus
RECORD = "stage.json"  # in a stage's output folder: written "running" when it starts, "complete" when it ends
STATUS_TAG = "fmrilm.status"  # ran | resumed | skipped
OUTPUT_RUN_TAG = "fmrilm.output_run_id"  # the run that produced the stage's output
KEY_TAG = "fmrilm.stage_key"


def stage_names(cfg: PipelineConfig) -> list[str]:
    """The stages a config runs, in order: synth only when the corpus has no sources of its own."""
    return [name for name in STAGES if name != "synth" or not cfg.corpus.sources]


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


def checkpoint_step(out: Path) -> int | None:
    """The step of the latest complete checkpoint a training stage left in `out` (its local `checkpoints/`, or Ray
    Train's storage `ray/`), None when there is none."""
    out, steps = Path(out), []
    for state in [*out.glob(f"checkpoints/step_*/{CLIENT_STATE}"), *out.glob(f"ray/*/checkpoint_*/{CLIENT_STATE}")]:
        if (state.parent / COMPLETE).exists():
            try:
                steps.append(int(json.loads(state.read_text())["step"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return max(steps, default=None)


def _numbers(summary: dict) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class _Stages:
    """Runs, skips or reuses the stages of one pipeline run and collects their results."""

    def __init__(self, tracker: Tracker, parent: StageRun, result: PipelineResult, modes: dict[str, str],
                 prefix: str = ""):
        self.tracker, self.parent, self.result, self.modes = tracker, parent, result, modes
        self.prefix = prefix  # "<variant>/" for the stages of an ablation variant

    def __call__(self, name: str, out: Path, config: dict, inputs: dict[str, dict], primary: str | None,
                 done: Callable[[], bool], run: Callable[[str | None], StageResult],
                 resume_point: Callable[[], int | bool | None] = lambda: None, mode: str | None = None) -> dict:
        """One stage: `config` and `inputs` (the records of the stages it reads; `primary` names the one its
        lineage tag points at) make its key; `done()` says whether its outputs are there; `run(input_run_id)` runs
        it; `resume_point()` says whether (from which step) an interrupted run would continue. Returns the
        stage's record. `mode` overrides the stage's mode (an ablation variant's stages are always "auto")."""
        mode = mode or self.modes[name]
        key = stage_key(name, config, inputs)
        record = read_record(out)
        input_run_id = inputs[primary]["run_id"] if primary else None
        if mode == "reuse":
            if record is None or record.get("status") != "complete":
                raise InputError(f"{out}: the {name} stage has not completed in this workdir (run the pipeline "
                                 "without --from / --only first)")
            self.result.stages.append(StageResult(self.prefix + name, out, None, record.get("summary", {}), "reused",
                                                  0.0, record["run_id"], stale=record.get("key") != key))
            return record

        started = time.monotonic()
        if (mode == "auto" and record is not None and record.get("status") == "complete"
                and record.get("key") == key and done()):
            tags = {STATUS_TAG: "skipped", OUTPUT_RUN_TAG: record["run_id"], KEY_TAG: key}
            with self.tracker.run(name, parent=self.parent, input_run_id=input_run_id, tags=tags) as skipped:
                skipped.log_metrics(_numbers(record.get("summary", {})))
            self.result.stages.append(StageResult(self.prefix + name, out, skipped.run_id, record.get("summary", {}),
                                                  "skipped",
                                                  time.monotonic() - started, record["run_id"]))
            return record

        if mode == "force" or (record is not None and record.get("key") != key):
            shutil.rmtree(out, ignore_errors=True)  # another config (or a forced rerun): start from scratch
        resumed = resume_point()
        begun = _now()
        identity = {k: {"key": r["key"], "run_id": r["run_id"], "out": r.get("out")} for k, r in inputs.items()}
        _write_record(out, {"stage": name, "status": "running", "key": key, "started": begun, "inputs": identity,
                            "input_run_id": input_run_id})
        stage = run(input_run_id)
        stage.name = self.prefix + stage.name
        stage.seconds = time.monotonic() - started
        stage.status = "resumed" if resumed not in (None, False) else "ran"
        stage.resumed_from = resumed if isinstance(resumed, int) and not isinstance(resumed, bool) else None
        stage.output_run_id = stage.run_id
        done_run = StageRun(self.tracker.client, stage.run_id) if stage.run_id else StageRun(None, None)
        done_run.set_tag(STATUS_TAG, stage.status)
        done_run.set_tag(KEY_TAG, key)
        record = {"stage": name, "status": "complete", "key": key, "run_id": stage.run_id,
                  "input_run_id": input_run_id, "inputs": identity, "out": str(out), "started": begun,
                  "finished": _now(), "seconds": round(stage.seconds, 3), "resumed_from_step": stage.resumed_from,
                  "tracking_uri": self.tracker.uri, "config": config, "summary": stage.summary}
        _write_record(out, record)
        self.result.stages.append(stage)
        return record


def _model_stages(stage: _Stages, cfg: PipelineConfig, root: Path, corpus: Path, records: dict[str, dict],
                  tracker: Tracker, parent: StageRun, shared: dict[str, dict] | None = None) -> dict[str, dict]:
    """tokenizer -> align -> instruct -> eval on the built corpus, each into root/<stage>; returns the records.
    `shared`: the main pipeline's records, for an ablation variant: a stage whose key equals the main one's (same
    config section, same inputs) is the main stage's output, read as it is instead of trained again."""
    records = dict(records)
    out = {name: root / name for name in MODEL_STAGES}
    tokenizer, align, instruct, evaluated = (out[n] for n in MODEL_STAGES)
    sized = with_corpus_sizes(cfg, corpus)
    plan = {  # name: (config, inputs, primary input, done, run, resume point)
        "tokenizer": ({"tokenizer": sized.tokenizer.model_dump(mode="json"), "workers": cfg.workers},
                      ("corpus",), lambda: all((tokenizer / "tokenizer" / f).is_file()
                                               for f in ("config.json", "model.safetensors")),
                      lambda run: run_tokenizer_train(cfg, corpus, tokenizer, tracker, parent, run)),
        "align": ({"align": cfg.align.model_dump(mode="json"), "workers": cfg.workers}, ("corpus", "tokenizer"),
                  lambda: (align / "brain.json").is_file(),
                  lambda run: run_llm_align(cfg, corpus, records["tokenizer"]["model"], align, tracker, parent,
                                            run)),
        "instruct": ({"instruct": cfg.instruct.model_dump(mode="json"), "workers": cfg.workers}, ("corpus", "align"),
                     lambda: (instruct / "brain.json").is_file(),
                     lambda run: run_llm_instruct(cfg, records["align"]["model"], corpus, instruct, tracker, parent,
                                                  run)),
        "eval": ({"eval": cfg.eval.model_dump(mode="json"), "instruct": cfg.instruct.model_dump(mode="json"),
                  "seed": cfg.seed}, ("corpus", "instruct"),
                 lambda: all((evaluated / f).is_file() for f in ("metrics.json", "report.html")),
                 lambda run: run_eval(cfg, records["instruct"]["model"], corpus, evaluated, tracker, parent, run)),
    }
    models = {"tokenizer": tokenizer / "tokenizer", "align": align, "instruct": instruct, "eval": evaluated}
    for name in MODEL_STAGES:
        if stage.modes.get(name, "auto") == "omit":
            continue
        config, needs, done, run = plan[name]
        inputs = {k: records[k] for k in needs}
        primary = needs[-1]
        if shared is not None and name in shared and shared[name]["key"] == stage_key(name, config, inputs):
            records[name] = shared[name]  # the variant does not change this stage: the main output is its output
            continue
        record = stage(name, out[name], config, inputs, primary, done=done, run=run,
                       resume_point=(lambda o=out[name]: checkpoint_step(o)) if name != "eval" else (lambda: None),
                       mode="auto" if shared is not None else None)
        records[name] = record | {"model": models[name]}
    return records


def run_pipeline(cfg: PipelineConfig, workdir: Path | None = None, progress=no_progress, *,
                 from_stage: str | None = None, only: str | None = None) -> PipelineResult:
    """Run the stages the config enables, in order, under one parent MLflow run; skip those done for the same
    config and inputs, continue an interrupted one. `from_stage` reruns that stage and the later ones from
    scratch, `only` just that one; earlier stages are read from the workdir."""
    workdir = Path(workdir or cfg.workdir)
    names = stage_names(cfg)
    modes = stage_modes(names, from_stage, only)
    if cfg.ablations:  # a bad variant fails now, not after the main model has trained
        from cluster.ablations import variant_config

        for name, overrides in cfg.ablations.items():
            variant_config(cfg, name, overrides)
    tracker = tracker_for(cfg, workdir)
    resolved = save_resolved(cfg, workdir)
    tags = {"fmrilm.from": from_stage} if from_stage else {"fmrilm.only": only} if only else {}
    with tracker.run("pipeline", params=flatten(cfg), tags=tags) as parent:
        parent.log_artifact(resolved)
        result = PipelineResult(workdir, tracker.uri, parent.run_id)
        stage = _Stages(tracker, parent, result, modes)
        records: dict[str, dict] = {}
        specs = list(cfg.corpus.sources)
        if "synth" in names:
            source = workdir / "source"
            records["synth"] = stage(
                "synth", source, {"synth": cfg.synth.model_dump(mode="json")}, {}, None,
                done=lambda: (source / "synth.json").is_file() and (source / "participants.tsv").is_file(),
                run=lambda _: run_synth(cfg, source, tracker, parent, progress))
            specs = [str(source)]
            if cfg.synth.format == "nifti":  # the synthetic cohort brings its own atlas
                cfg = cfg.model_copy(deep=True)
                cfg.corpus.source.atlas = atlas_config(source)

        corpus = workdir / "corpus"
        if modes["corpus"] != "omit":
            inputs = {"synth": records["synth"]} if "synth" in records else {}
            # the corpus's own notion of "the same config" (not how many workers built it); sources by name here,
            # their files are checked by finished_build
            config = {"corpus": corpus_fingerprint(cfg.corpus, list(cfg.corpus.sources)), "seed": cfg.seed}
            records["corpus"] = stage(
                "corpus", corpus, config, inputs, "synth" if inputs else None,
                done=lambda: finished_build(specs, cfg.corpus, corpus, cfg.seed) is not None,
                # overwrite: the pipeline owns this folder; a build of the same inputs resumes, another is replaced
                run=lambda input_run: run_corpus_build(cfg, specs, corpus, tracker, parent, input_run, overwrite=True,
                                                       progress=progress),
                resume_point=lambda: (corpus / "build.json").is_file() and not (corpus / "complete.json").is_file())

        records = _model_stages(stage, cfg, workdir, corpus, records, tracker, parent)
        if cfg.ablations and modes["eval"] != "omit":
            from cluster.ablations import run_ablations

            run_ablations(cfg, workdir, corpus, records, result, tracker, parent)

        (workdir / "pipeline.json").write_text(json.dumps(
            {"parent_run_id": parent.run_id, "tracking_uri": tracker.uri,
             "stages": [summary_row(s) for s in result.stages]}, indent=2))
        parent.log_artifact(workdir / "pipeline.json")
    return result


def key_metric(stage: StageResult) -> str:
    """The one figure that says how a stage went."""
    s, name = stage.summary, stage.name.rsplit("/", 1)[-1]  # an ablation variant's stages are "<variant>/<stage>"
    if name == "synth" and "scans" in s:
        return f"{s['scans']} scans"
    if name == "corpus" and {"ok", "scans"} <= set(s):
        return f"{s['ok']}/{s['scans']} scans ok"
    if name == "tokenizer" and "reconstruction_r2" in s:
        return f"val R^2 {s['reconstruction_r2']:.3f}"
    if name == "align":
        for key, label in (("f2f_accuracy", "val F2F acc"), ("caption_fidelity", "val caption fidelity"),
                           ("t2t_perplexity_text_rows", "val T2T ppl")):
            if isinstance(s.get(key), (int, float)):
                return f"{label} {s[key]:.3f}"
    if name == "instruct" and isinstance(s.get("answer_loss"), (int, float)):
        return f"val answer loss {s['answer_loss']:.3f} (before {s.get('answer_loss_before', float('nan')):.3f})"
    if name == "eval":  # the first classification task's tuned model beside the FC baseline
        for key, value in s.items():
            task, protocol, metric = (key.split("/") + ["", ""])[:3]
            baseline = s.get(f"{task}/fc_baseline/auc")
            if metric == "auc" and protocol not in ("fc_baseline", "tokenizer_probe") and baseline is not None:
                return f"{task} AUC {value:.3f} ({protocol}; FC baseline {baseline:.3f})"
    return ""


def summary_row(stage: StageResult) -> dict:
    status = stage.status
    if stage.status == "resumed" and stage.resumed_from is not None:
        status = f"resumed from step {stage.resumed_from}"
    elif stage.status == "reused" and stage.stale:
        status = "reused (other config)"
    return {"stage": stage.name, "status": status, "seconds": round(stage.seconds, 2), "metric": key_metric(stage),
            "out": str(stage.out), "run_id": stage.run_id, "output_run_id": stage.output_run_id}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}:{sec:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def summary_table(result: PipelineResult) -> str:
    """One line per stage: stage, what happened, time, key metric, output folder."""
    rows = [("stage", "status", "time", "key metric", "output")]
    rows += [(r["stage"], r["status"], _duration(r["seconds"]) if r["status"] != "reused" else "-", r["metric"],
              r["out"]) for r in map(summary_row, result.stages)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths)), row[4]]).rstrip()
                     for row in rows)
