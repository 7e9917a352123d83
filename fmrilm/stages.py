"""The built-in stages, each declared once (`fmrilm.stage.Stage`) in `REGISTRY`, in pipeline order:

    synth (only without corpus sources) -> corpus -> tokenizer -> align -> instruct -> eval

and the adapters that run them (the libraries imported when a stage runs, so the CLI reads this registry at
start-up for free): plain library calls (`corpus_builder.synth.synthesize`, ...) inside an MLflow run,
the resolved config written next to every output. The three training stages share one adapter
(`run_training_stage`): a `Training` names the config section, the package's `train(cfg, inputs, runtime)`, its
typed inputs dataclass (filled from the stage's inputs and its output folder) and the files logged as artifacts;
`cluster.launch.run_training` runs it in-process or on Ray Train workers.

Adding a stage: its package code, then one declaration here, e.g.

    REGISTRY.add(Stage(
        name="probe", inputs={"corpus": "corpus", "model": "instruct"},   # argument -> the stage that hands it on
        key=lambda cfg: {"eval": cfg.eval.model_dump(mode="json")},         # the config its key hashes
        run=run_probe,                                                      # StageContext -> StageResult
        done=lambda ctx: (ctx.out / "probe.json").is_file(),                # what marks it done
        metric=lambda s: f"AUC {s['auc']:.3f}" if "auc" in s else ""))     # its headline figure

The pipeline, --from / --only, the summary table and the CLI's stage list follow from the registry.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.launch import CHECKPOINTS, STORAGE, checkpoint_step
from fmrilm.config import PipelineConfig, flatten, save_resolved, with_value
from fmrilm.progress import no_progress, step_reporter
from fmrilm.stage import Registry, Stage, StageContext, StageResult, numbers
from fmrilm_core.errors import InputError

if TYPE_CHECKING:
    from corpus_builder.config import CorpusConfig
    from fmrilm.tracking import StageRun, Tracker

RESOLVED = "config.resolved.yaml"  # `save_resolved`'s file
METRICS = "metrics.json"


def _dump(cfg: PipelineConfig, *sections: str) -> dict:
    return {name: getattr(cfg, name).model_dump(mode="json") for name in sections}


# ---- synth -----------------------------------------------------------------------------------------------------

def run_synth(cfg: PipelineConfig, out: Path, tracker: Tracker, parent: StageRun | None = None,
              progress=no_progress) -> StageResult:
    """Stage: write a synthetic cohort (tables layout) into `out`."""
    from corpus_builder.synth import synthesize
    from corpus_builder.synth_nifti import write_nifti_cohort

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


def _synth_atlas(cfg: PipelineConfig, out: Path) -> PipelineConfig:
    """A synthetic NIfTI cohort brings its own atlas: the corpus reads the scans with it."""
    if cfg.synth.format != "nifti":
        return cfg
    from corpus_builder.synth_nifti import atlas_config

    return with_value(cfg, "corpus.source.atlas", atlas_config(out))


# ---- corpus ----------------------------------------------------------------------------------------------------

def run_timeseries(cfg: PipelineConfig, specs: list[str], out: Path, tracker: Tracker,
                   parent: StageRun | None = None, input_run_id: str | None = None,
                   progress=no_progress) -> StageResult:
    """Every scan of the sources -> clean [T, N] series at TR 2.0 s (`corpus_builder.extraction`); a command, not a
    pipeline stage."""
    from corpus_builder.extraction import discover_all, extract_all

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
    from corpus_builder.build import build_corpus, finished_build
    from corpus_builder.extraction import discover_all

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


def run_corpus_add(specs: list[str], out: Path, tracker: Tracker, cfg: CorpusConfig | None = None,
                   ray_address: str | None = None, progress=no_progress) -> StageResult:
    """`fmrilm corpus add` (not a pipeline stage): the new scans of `specs` as a new version of the corpus `out`, in
    an MLflow run `corpus-add` beside the build's (its metrics, the new version's record as an artifact)."""
    from corpus_builder.grow import add_to_corpus
    from corpus_builder.versions import version_path

    with tracker.run("corpus-add", params={"corpus": str(out), "sources": ",".join(specs)}) as run:
        result = add_to_corpus(specs, out, cfg, progress=progress, ray_address=ray_address)
        run.set_tag("corpus.version", str(result["version"]))
        run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                        | {f"split.{k}": v for k, v in result.get("splits", {}).items()})
        if result["added"]:
            run.log_artifact(out / version_path(result["version"]))
        return StageResult("corpus-add", out, run.run_id, result)


def _sources(ctx: StageContext) -> list[str]:
    """The corpus's sources: the synthetic cohort when the pipeline wrote one, else the config's."""
    return [str(ctx.inputs["source"])] if "source" in ctx.inputs else list(ctx.cfg.corpus.sources)


def _corpus_key(cfg: PipelineConfig) -> dict:
    """The corpus's own notion of "the same config" (not how many workers built it); sources by name here, their
    files are checked by finished_build."""
    from corpus_builder.build import config_fingerprint

    return {"corpus": config_fingerprint(cfg.corpus, list(cfg.corpus.sources)), "seed": cfg.seed}


def _corpus_done(ctx: StageContext) -> bool:
    from corpus_builder.build import finished_build

    return finished_build(_sources(ctx), ctx.cfg.corpus, ctx.out, ctx.cfg.seed) is not None


def _corpus_interrupted(ctx: StageContext) -> bool:
    from corpus_builder.build import COMPLETE, STARTED

    return (ctx.out / STARTED).is_file() and not (ctx.out / COMPLETE).is_file()


def _build(ctx: StageContext) -> StageResult:
    # overwrite: the pipeline owns this folder; a build of the same inputs resumes, another is replaced
    return run_corpus_build(ctx.cfg, _sources(ctx), ctx.out, ctx.tracker, ctx.parent, ctx.input_run_id,
                            overwrite=True, progress=ctx.progress)


def with_corpus_sizes(cfg: PipelineConfig, corpus: Path) -> PipelineConfig:
    """The config with the sizes that follow from the data taken from the corpus (N ROIs, T volumes), not from a
    second copy in the config: a cohort of another atlas runs through the same config. A size the config sets
    explicitly (the YAML or --set) must agree with the corpus: a one-line InputError otherwise."""
    from corpus_builder.readers import open_zarr

    _, length, n_rois = open_zarr(corpus).shape
    model = cfg.tokenizer.model
    for key, found, unit in (("n_rois", n_rois, "ROIs"), ("length", length, "volumes per scan")):
        if key in model.model_fields_set and getattr(model, key) != found:
            raise InputError(f"tokenizer.model.{key}={getattr(model, key)} disagrees with the corpus {corpus}, which "
                             f"has {found} {unit} (leave tokenizer.model.{key} unset to take the corpus's)")
    if (model.n_rois, model.length) == (n_rois, length):
        return cfg
    return with_value(cfg, "tokenizer.model", model.model_copy(update={"n_rois": n_rois, "length": length}))


# ---- the training stages: one adapter ------------------------------------------------------------------------

@dataclass(frozen=True)
class Training:
    """How a training stage runs: `train(cfg.<section>, inputs(**stage inputs, out=folder), runtime)`."""

    section: str  # its config section
    train: str  # "module:function", imported when the stage runs
    inputs: str  # "module:Dataclass", the typed inputs of `train`
    logged: Callable[[Path], list[Path]]  # what of its output folder goes to MLflow as artifacts


def _load(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_training_stage(spec: Training, ctx: StageContext) -> StageResult:
    """A training stage (DeepSpeed; in-process or `workers` Ray Train workers) inside its MLflow run: its figures
    (the last validation) in `metrics.json` and the summary, the spec's files as artifacts."""
    from cluster.launch import run_training
    from fmrilm.tracking import mlflow_logger

    section = getattr(ctx.cfg, spec.section)
    with ctx.run({**flatten(section), "workers": ctx.cfg.workers}) as run:
        save_resolved(ctx.cfg, ctx.out)
        inputs = _load(spec.inputs)(**ctx.inputs, out=ctx.out)
        metrics = run_training(_load(spec.train), section, inputs, workers=ctx.cfg.workers, name=ctx.name,
                               log_fn=mlflow_logger(ctx.tracker, run.run_id), progress_fn=step_reporter)
        summary = {k.removeprefix("val/"): v for k, v in metrics.items()}
        (ctx.out / METRICS).write_text(json.dumps(summary, indent=1))
        for item in spec.logged(ctx.out):
            run.log_artifact(item)
        return StageResult(ctx.name, ctx.out, run.run_id, summary)


def training_stage(name: str, training: Training, **declared) -> Stage:
    """A training stage: keyed by its config section and the worker count, resumed from its last checkpoint,
    rerun by every ablation variant."""
    return Stage(name=name, key=lambda cfg: _dump(cfg, training.section) | {"workers": cfg.workers},
                 run=partial(run_training_stage, training), resume=lambda ctx: checkpoint_step(ctx.out),
                 variant=True, **declared)


def _files(*names: str) -> Callable[[Path], list[Path]]:
    return lambda out: [out / name for name in names]


def _folder_less(*names: str) -> Callable[[Path], list[Path]]:
    """The folder's items but `names` (checkpoints, Ray's storage, a GGUF base copy): the model folder."""
    return lambda out: [item for item in sorted(out.iterdir()) if item.name not in names]


def _exported_tokenizer(ctx: StageContext) -> bool:
    from tokenizer_train.export import CONFIG_FILE, WEIGHTS_FILE

    return all((ctx.out / "tokenizer" / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE))


def _model_folder(ctx: StageContext) -> bool:
    from llm_train.export import META

    return (ctx.out / META).is_file()


def _tokenizer_metric(s: dict) -> str:
    return f"val R^2 {s['reconstruction_r2']:.3f}" if "reconstruction_r2" in s else ""


def _align_metric(s: dict) -> str:
    for key, label in (("f2f_accuracy", "val F2F acc"), ("caption_fidelity", "val caption fidelity"),
                       ("t2t_perplexity_text_rows", "val T2T ppl")):
        if isinstance(s.get(key), (int, float)):
            return f"{label} {s[key]:.3f}"
    return ""


def _instruct_metric(s: dict) -> str:
    if not isinstance(s.get("answer_loss"), (int, float)):
        return ""
    return f"val answer loss {s['answer_loss']:.3f} (before {s.get('answer_loss_before', float('nan')):.3f})"


# ---- eval ------------------------------------------------------------------------------------------------------

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
    from cluster.launch import run_training
    from evaluation.task_eval import evaluate_tasks

    ev = cfg.eval
    tune = cfg.instruct
    if ev.finetune_steps is not None:
        tune = tune.model_copy(update={"steps": ev.finetune_steps, "checkpoint_every": ev.finetune_steps,
                                       "eval_every": ev.finetune_steps})

    def on_workers(train_fn, tune_cfg, inputs, name: str) -> dict:
        """A fine-tuning on Ray Train workers like every other training, its storage in the fine-tuning's folder."""
        return run_training(train_fn, tune_cfg, inputs, workers=cfg.workers, log_fn=None,
                            storage=Path(inputs.out) / STORAGE, name=name)

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
            out.update({prefix + k: v for k, v in numbers(figures).items()})
            for name, ci in (figures.get("ci") or {}).items() if isinstance(figures.get("ci"), dict) else ():
                out.update({prefix + name + k: v for k, v in _interval(ci).items()})
            versus = figures.get("vs_fc_baseline")
            for name, d in versus.items() if isinstance(versus, dict) else ():
                if isinstance(d, dict):
                    out.update({prefix + f"{name}_vs_fc": v for v in numbers({"d": d.get("diff")}).values()})
                    out.update({prefix + f"{name}_vs_fc" + k: v for k, v in _interval(d.get("ci")).items()})
    return out


def _interval(ci) -> dict[str, float]:
    """{"_ci_lo": lo, "_ci_hi": hi} of a [lo, hi] interval; {} of anything else (None: undefined)."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return {k: v for k, v in zip(("_ci_lo", "_ci_hi"), (numbers({"v": c}).get("v") for c in ci)) if v is not None}
    return {}


def _eval_metric(s: dict) -> str:
    """The first classification task's tuned model beside the FC baseline."""
    for key, value in s.items():
        task, protocol, metric = (key.split("/") + ["", ""])[:3]
        baseline = s.get(f"{task}/fc_baseline/auc")
        if metric == "auc" and protocol not in ("fc_baseline", "tokenizer_probe") and baseline is not None:
            return f"{task} AUC {value:.3f} ({protocol}; FC baseline {baseline:.3f})"
    return ""


# ---- the registry ----------------------------------------------------------------------------------------------

REGISTRY = Registry([
    Stage(name="synth", folder="source", applies=lambda cfg: not cfg.corpus.sources,
          key=lambda cfg: _dump(cfg, "synth"),
          run=lambda ctx: run_synth(ctx.cfg, ctx.out, ctx.tracker, ctx.parent, ctx.progress),
          done=lambda ctx: (ctx.out / "synth.json").is_file() and (ctx.out / "participants.tsv").is_file(),
          configures=_synth_atlas, metric=lambda s: f"{s['scans']} scans" if "scans" in s else ""),
    Stage(name="corpus", inputs={"source": "synth"}, key=_corpus_key, run=_build, done=_corpus_done,
          resume=_corpus_interrupted,
          metric=lambda s: f"{s['ok']}/{s['scans']} scans ok" if {"ok", "scans"} <= set(s) else ""),
    training_stage("tokenizer", Training("tokenizer", "tokenizer_train.train:train",
                                         "tokenizer_train.train:TokenizerInputs",
                                         _files("tokenizer", METRICS, RESOLVED)),
                   inputs={"corpus": "corpus"}, prepare=lambda cfg, inputs: with_corpus_sizes(cfg, inputs["corpus"]),
                   done=_exported_tokenizer, output=lambda out: out / "tokenizer", metric=_tokenizer_metric),
    training_stage("align", Training("align", "llm_train.train:train", "llm_train.train:AlignInputs",
                                     _folder_less(CHECKPOINTS, STORAGE, "base")),
                   inputs={"corpus": "corpus", "tokenizer": "tokenizer"}, done=_model_folder, metric=_align_metric),
    training_stage("instruct", Training("instruct", "llm_train.instruct:train", "llm_train.instruct:InstructInputs",
                                        _folder_less(CHECKPOINTS, STORAGE)),
                   inputs={"corpus": "corpus", "model": "align"}, done=_model_folder, metric=_instruct_metric),
    Stage(name="eval", inputs={"corpus": "corpus", "model": "instruct"}, variant=True,
          key=lambda cfg: _dump(cfg, "eval", "instruct") | {"seed": cfg.seed},
          run=lambda ctx: run_eval(ctx.cfg, ctx.inputs["model"], ctx.inputs["corpus"], ctx.out, ctx.tracker,
                                   ctx.parent, ctx.input_run_id),
          done=lambda ctx: all((ctx.out / f).is_file() for f in ("metrics.json", "report.html")),
          metric=_eval_metric),
])
