"""`fmrilm corpus ...`: build a corpus from its sources, grow it with new scans, say what it holds and prove it is
still the corpus that was built (docs/corpus.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fmrilm.cli_common import ConfigOpt, SetOpt, fail, group, guard, load
from fmrilm.progress import progress_bar

AddressOpt = Annotated[str | None, typer.Option(
    help="Ray cluster ('auto' or HOST:PORT), checked first; default $RAY_ADDRESS or a local Ray")]

corpus_app = group("Build the corpus from its sources.")


@corpus_app.command("build")
def corpus_build(
    source: Annotated[str, typer.Option(help="source root(s), comma-separated; kind:PATH forces a layout")],
    out: Annotated[Path, typer.Option("--out", "-o", help="corpus folder (shards, zarr, manifest, norms)")],
    overwrite: Annotated[bool, typer.Option(help="replace a corpus built with another config")] = False,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build the sharded corpus as a Ray job: webdataset tars, zarr, manifest, norms. Re-running resumes."""
    from cluster.address import probe_ray
    from fmrilm.stages import run_corpus_build
    from fmrilm.tracking import tracker_for

    cfg = load(config, set_)
    guard(probe_ray, address)  # a wrong address: one line in seconds, not Ray's minute of retries
    specs = [s for s in source.split(",") if s]
    result = guard(run_corpus_build, cfg, specs, out, tracker_for(cfg, cfg.workdir), overwrite=overwrite,
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
    from fmrilm.stages import run_timeseries
    from fmrilm.tracking import tracker_for

    cfg = load(config, set_)
    specs = [s for s in source.split(",") if s]
    result = guard(run_timeseries, cfg, specs, out, tracker_for(cfg, cfg.workdir), progress=progress_bar)
    summary = result.summary
    for line in summary["failures"][:20]:
        typer.echo(f"  failed: {line}", err=True)
    typer.echo(f"{summary['ok']} ok, {summary['failed']} failed of {summary['scans']} scans -> {out}"
               f"  (MLflow run {result.run_id})")



def _corpus_config(corpus: Path, config: Path | None, set_: list[str] | None):
    """The corpus's own config (recorded by its build), with --set overrides of how it runs (corpus.build.*); with
    --config, that file's corpus section (checked against the corpus's)."""
    from corpus_builder.config import CorpusConfig
    from corpus_builder.grow import corpus_config
    from fmrilm.config import apply_overrides

    if config is not None:
        return load(config, set_).corpus
    stored = guard(corpus_config, corpus)
    if not set_:
        return None
    data = apply_overrides({"corpus": stored.model_dump(mode="json")}, list(set_))
    try:
        return CorpusConfig.model_validate(data["corpus"])
    except ValueError as err:
        fail(f"--set: {' '.join(str(err).split())[:300]}")


@corpus_app.command("add")
def corpus_add(
    corpus: Annotated[Path, typer.Option(help="a finished corpus (`fmrilm corpus build`)")],
    source: Annotated[str, typer.Option(help="source root(s) of the new scans, comma-separated; kind:PATH forces a "
                                             "layout")],
    address: AddressOpt = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="only for a corpus built before versions: the config it was built with")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="how the add runs, e.g. corpus.build.workers=8 (the content settings are the "
                            "corpus's)")] = None,
) -> None:
    """Add the scans of new sources as a new corpus version: new shards only (the finished ones stay
    byte-identical), frozen norms and reference fit, a subject keeps its split. Re-running resumes; re-adding a
    source adds nothing."""
    from cluster.address import probe_ray
    from fmrilm.stages import RESOLVED, run_corpus_add
    from fmrilm.tracking import tracker_for

    cfg = _corpus_config(corpus, config, set_)
    guard(probe_ray, address)
    specs = [s for s in source.split(",") if s]
    # the run store and experiment of the build: the config it recorded (a build by `fmrilm`), else --config's
    built = corpus / RESOLVED
    project = load(built if built.is_file() and config is None else config, None)
    run = guard(run_corpus_add, specs, corpus, tracker_for(project, project.workdir), cfg, ray_address=address,
                progress=progress_bar)
    result = run.summary
    if not result["added"]:
        typer.echo(f"nothing to add: every scan of {source} is in {corpus} (version {result['version']})")
        return
    splits = ", ".join(f"{k} {v}" for k, v in sorted(result["splits"].items()))
    typer.echo(f"version {result['version']}: +{result['scans']} scans ({result['ok']} ok, {result['failed']} "
               f"failed; {result['subjects']} new subjects, {result['sessions_of_known_subjects']} sessions of known "
               f"ones; {splits}) in {result['shards']} new shards -> {corpus}  ({result['seconds']} s; MLflow run "
               f"{run.run_id})")


@corpus_app.command("info")
def corpus_info_cmd(
    corpus: Annotated[Path, typer.Argument(help="a corpus folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Counts per dataset, split, status and version; failure reasons grouped; QC summaries (TR, length, mean
    FD)."""
    from corpus_builder.info import corpus_info, format_info

    info = guard(corpus_info, corpus)
    typer.echo(json.dumps(info, indent=1) if as_json else format_info(info))


@corpus_app.command("verify")
def corpus_verify(
    corpus: Annotated[Path, typer.Argument(help="a corpus folder")],
    repair: Annotated[bool, typer.Option(help="rebuild the damaged shards from their sources")] = False,
    address: AddressOpt = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="only for a corpus built before versions: the config it was built with")] = None,
) -> None:
    """Check every shard, zarr block and manifest against the checksums written when they were built; a damaged
    member is named in one line; exit 1 when any is. --repair rebuilds the damaged shards from their sources."""
    from corpus_builder.grow import repair as repair_corpus
    from corpus_builder.versions import verify

    if repair:
        from cluster.address import probe_ray

        guard(probe_ray, address)
        cfg = _corpus_config(corpus, config, None)
        report = guard(repair_corpus, corpus, cfg, progress=progress_bar, ray_address=address)
        for item in report["repaired"]:
            typer.echo(f"repaired: {item}")
    else:
        report = guard(verify, corpus)
    for p in report["problems"]:
        typer.echo(f"{corpus / p['path']}: {p['problem']}" + (f" (shard {p['shard']})" if p["shard"] else ""),
                   err=True)
    state = "damaged" if report["problems"] else "ok"
    typer.echo(f"{corpus}: version {report['version']}, {report['files_checked']} recorded files checked: {state}")
    if report["problems"]:
        raise typer.Exit(1)
