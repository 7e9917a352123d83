"""What every `fmrilm` command shares: the `--config` / `--set` options, loading the config, and turning bad input
into one line on stderr and exit code 2 (FMRILM_DEBUG=1 shows the traceback instead)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fmrilm.config import PipelineConfig, load_config
from fmrilm_core.errors import InputError

MARKUP = "markdown"  # Rich markup (typer's default) would eat the "[config key: default]" hints of the option help

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a config key: a.b=value (repeatable)")]


def group(help: str) -> typer.Typer:
    """A sub-command group, rendered as the root app renders its help."""
    return typer.Typer(rich_markup_mode=MARKUP, no_args_is_help=True, help=help)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def load(config: Path | None, overrides: list[str] | None, extra: list[str] | None = None) -> PipelineConfig:
    try:
        return load_config(config, list(overrides or []) + list(extra or []))
    except InputError as exc:
        fail(str(exc))


def guard(fn, *args, **kwargs):
    """Run a command body: bad input becomes a one-line error and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        if os.environ.get("FMRILM_DEBUG"):
            raise
        fail(str(exc))
