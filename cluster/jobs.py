"""`fmrilm submit` and `fmrilm jobs`: run an fmrilm command on a Ray cluster through Ray's Job Submission API,
and follow, inspect or stop it afterwards.

A job carries the project folder (code and configs; not `runs/`, `.venv/`, `.git/`, MLflow stores or caches) as
its working dir and runs `python -m fmrilm.cli <command>` there, with the head node's `python`. That runs the
code you submitted, not whatever copy of the project a node has installed; the nodes only need the project's
dependencies on that `python` (activate the environment before `ray start`, or bake it into the image). Paths in
the command are paths on the cluster: a relative one lands in the job's temporary copy of the project.

Environment passed to the job: MLFLOW_TRACKING_URI when set here, FMRILM_PSEUDONYM_KEY_FILE (a path to the key on
the cluster: the secret itself never travels, so FMRILM_PSEUDONYM_KEY set by value is refused), `--env` pairs,
and the log-quieting variables of `cluster.logs`.

Before building Ray's client, the dashboard is probed with a short timeout (`cluster.address`, which also finds
the auth token a cluster asks for), so a wrong address is a one-line error in seconds, not a long connection retry.
This module starts the job; what the job runs is the `fmrilm` entry package's CLI, named here, never imported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cluster.address import probe_dashboard, resolve_address
from cluster.logs import QUIET_ENV, verbose
from fmrilm_core.errors import InputError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULE = "fmrilm.cli"  # what a job runs: `python -m fmrilm.cli <command>`

# gitignore-style patterns Ray leaves out of the uploaded working dir (it also honours the project's .gitignore)
EXCLUDES = ["runs/", ".venv/", "venv/", ".git/", "mlruns/", "mlartifacts/", "*.db", "__pycache__/", "*.pyc",
            ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", ".ipynb_checkpoints/", "*.egg-info/", ".hypothesis/"]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "FMRILM_PSEUDONYM_KEY_FILE", "FMRILM_DEBUG", "FMRILM_VERBOSE",
                 "FMRILM_LOG_INTERVAL")
KEY_ENV, KEY_FILE_ENV = "FMRILM_PSEUDONYM_KEY", "FMRILM_PSEUDONYM_KEY_FILE"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_OUTPUT_OPTIONS = ("--out", "-o", "--workdir")


@contextmanager
def _address_env(address: str) -> Iterator[None]:
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address a client is given; the one the user
    # named (and we probed) must win
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def connect(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for the cluster at `address` (see `resolve_address`), after a quick probe."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    headers = probe_dashboard(url)
    if not verbose():  # Ray's per-request INFO lines (levels set at its import, so here),
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # and its notice that .git / .venv are now left out by default (EXCLUDES leaves them out anyway)
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    try:
        with _address_env(url):
            return JobSubmissionClient(url, headers=headers or None)
    except Exception as exc:  # the probe answered, so this is a version or auth mismatch: say it in one line
        raise InputError(f"cannot use the Jobs API at {url}: {_one_line(exc)}") from None


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def job_env(extra: dict[str, str] | None = None, project_root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Environment variables a job gets. The pseudonym secret goes by reference only (a key file on the
    cluster), never by value."""
    extra = dict(extra or {})
    if KEY_ENV in extra or os.environ.get(KEY_ENV):
        raise InputError(f"{KEY_ENV} holds the pseudonym secret by value, which a job never carries: put the key "
                         f"in a file on the cluster and set {KEY_FILE_ENV} to its path")
    env = dict(QUIET_ENV)  # the quiet-logging settings, for workers that `ray start` launched, not this process
    env.update({name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)})
    env.update(extra)
    key_file = env.get(KEY_FILE_ENV)
    if key_file:
        path = Path(key_file)
        if not path.is_absolute():
            raise InputError(f"{KEY_FILE_ENV}={key_file}: give the key file's absolute path on the cluster")
        if path.resolve().is_relative_to(project_root.resolve()):
            raise InputError(f"{KEY_FILE_ENV}={key_file} lies inside the project folder, which is uploaded with "
                             "the job: keep the key outside it, on the cluster")
    return env


def runtime_env(extra_env: dict[str, str] | None = None, project_root: Path = PROJECT_ROOT) -> dict:
    """The job's Ray runtime env: the project folder as working dir, minus outputs, environments and caches."""
    return {"working_dir": str(project_root), "excludes": list(EXCLUDES), "env_vars": job_env(extra_env, project_root)}


def entrypoint(command: list[str]) -> str:
    """The shell line a job runs: `python -m fmrilm.cli <command>` (a leading `fmrilm` is dropped)."""
    args = list(command)
    if args and args[0] == "fmrilm":
        args = args[1:]
    if not args:
        raise InputError("give the fmrilm command to run after --, e.g. fmrilm submit -- pipeline --config C")
    return shlex.join(["python", "-m", ENTRY_MODULE, *args])


def relative_outputs(command: list[str]) -> list[str]:
    """Output paths in `command` that are relative (they would land in the job's temporary working dir)."""
    found = []
    for i, arg in enumerate(command):
        value = None
        if arg in _OUTPUT_OPTIONS and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith(tuple(f"{o}=" for o in _OUTPUT_OPTIONS if o.startswith("--"))):
            value = arg.split("=", 1)[1]
        elif arg.startswith("workdir="):  # --set workdir=...
            value = arg.split("=", 1)[1]
        if value and "://" not in value and not Path(value).is_absolute():
            found.append(value)
    return found


def submit(client: JobSubmissionClient, command: list[str], extra_env: dict[str, str] | None = None,
           project_root: Path = PROJECT_ROOT, submission_id: str | None = None) -> str:
    """Submit `command` (an fmrilm command line, as a list) as a Ray job; returns its id."""
    line = entrypoint(command)
    env = runtime_env(extra_env, project_root)
    try:
        return client.submit_job(entrypoint=line, runtime_env=env, submission_id=submission_id,
                                 metadata={"fmrilm.command": shlex.join(command)})
    except Exception as exc:
        raise InputError(f"submitting the job failed: {_one_line(exc)}") from None


def _call(client: JobSubmissionClient, job_id: str, fn, *args):
    try:
        return fn(job_id, *args)
    except Exception as exc:  # Ray answers an unknown id with HTTP 404 in a RuntimeError
        if "404" in str(exc) or "does not exist" in str(exc):
            raise InputError(f"no job {job_id!r} on the cluster at {client.get_address()}") from None
        raise InputError(f"job {job_id}: {_one_line(exc)}") from None


def info(client: JobSubmissionClient, job_id: str) -> JobDetails:
    return _call(client, job_id, client.get_job_info)


def state(details: JobDetails) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(getattr(details.status, "value", details.status))


def status_line(details: JobDetails) -> str:
    """`ID: STATUS (message)`, the message when Ray has one (a failed entrypoint's exit code, say)."""
    job_id = details.submission_id or details.job_id
    status = state(details)
    message = _one_line(details.message) if details.message else ""
    elapsed = ""
    if details.start_time and details.end_time:
        elapsed = f" after {(details.end_time - details.start_time) / 1000:.0f} s"
    return f"{job_id}: {status}{elapsed}" + (f" ({message})" if message and status != "SUCCEEDED" else "")


def exit_code(details: JobDetails) -> int:
    """0 for a job that succeeded, 1 for one that failed or was stopped."""
    return 0 if state(details) == "SUCCEEDED" else 1


def logs(client: JobSubmissionClient, job_id: str) -> str:
    return _call(client, job_id, client.get_job_logs)


def stop(client: JobSubmissionClient, job_id: str) -> bool:
    """Ask the job to stop; False when it had already finished."""
    return bool(_call(client, job_id, client.stop_job))


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    try:
        jobs = client.list_jobs()
    except Exception as exc:
        raise InputError(f"listing jobs failed: {_one_line(exc)}") from None
    return sorted(jobs, key=lambda j: j.start_time or 0)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout, poll_s: float = 1.0) -> JobDetails:
    """Stream the job's log to `out` until it ends; returns its final details."""
    info(client, job_id)  # an unknown id is a one-line error, not a websocket failure

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except Exception:  # the log stream broke off (network, head restarted): the status below still decides
        pass
    while True:  # the stream can close a moment before the status turns terminal
        details = info(client, job_id)
        if state(details) in TERMINAL:
            return details
        time.sleep(poll_s)
