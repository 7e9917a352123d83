"""`fmrilm submit` and `fmrilm jobs`: an fmrilm command as a Ray job on a cluster (`cluster.jobs`)."""

from __future__ import annotations

from typing import Annotated

import typer

from fmrilm.cli_common import fail, group, guard

AddressOpt = Annotated[str | None, typer.Option(
    help="Ray dashboard of the cluster, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, "
         "else http://127.0.0.1:8265)")]


def _follow_job(client, job_id: str) -> None:
    """Stream a job's log, then exit with its status: 0 succeeded, 1 failed or stopped."""
    from cluster import jobs

    try:
        details = guard(jobs.follow, client, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the job keeps running (fmrilm jobs stop {job_id} ends it)", err=True)
        raise typer.Exit(130) from None
    typer.echo(jobs.status_line(details), err=True)
    raise typer.Exit(jobs.exit_code(details))


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
            fail(f"--env {item!r}: expected KEY=VALUE")
        pairs[key] = value
    guard(jobs.job_env, pairs)  # refuse a secret passed by value before touching the network
    for path in jobs.relative_outputs(command):
        typer.echo(f"warning: {path} is relative: on the cluster it lands in the job's temporary copy of the "
                   "project; give a path on shared storage", err=True)
    client = guard(jobs.connect, address)
    job_id = guard(jobs.submit, client, command, pairs)
    typer.echo(job_id)
    if follow:
        _follow_job(client, job_id)


jobs_app = group("Follow, inspect or stop jobs started by `fmrilm submit`.")
JobIdArg = Annotated[str, typer.Argument(help="the job id `fmrilm submit` printed")]


@jobs_app.command("status")
def jobs_status(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Print a job's status (and why it failed, when it did)."""
    from cluster import jobs

    client = guard(jobs.connect, address)
    details = guard(jobs.info, client, job_id)
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

    client = guard(jobs.connect, address)
    if follow:
        _follow_job(client, job_id)
    typer.echo(guard(jobs.logs, client, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Ask a running job to stop."""
    from cluster import jobs

    client = guard(jobs.connect, address)
    if guard(jobs.stop, client, job_id):
        typer.echo(f"{job_id}: stop requested")
    else:
        typer.echo(jobs.status_line(guard(jobs.info, client, job_id)) + "  (already finished)")


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """List the cluster's jobs, oldest first."""
    from cluster import jobs

    client = guard(jobs.connect, address)
    for details in guard(jobs.list_jobs, client):
        typer.echo(f"{jobs.status_line(details)}  {details.entrypoint}")
