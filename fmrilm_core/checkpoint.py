"""Checkpoints of a training stage: save every k steps, resume first, and refuse a checkpoint of another config.

A checkpoint is a folder from `runtime.checkpoint_dir(step)` holding the DeepSpeed engine's state (tag "engine",
every rank's part) and `CLIENT_STATE`, a JSON written by rank 0: the step reached, the config fingerprint and
whatever else the stage adds. The fingerprint hashes the config minus what may change between a run and its
resumption (the run length, the checkpoint and evaluation cadence), so a resumed run continues only the training
it was started as.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel

from fmrilm_core.errors import InputError
from fmrilm_core.runtime import Runtime

CLIENT_STATE = "fmrilm_state.json"
ENGINE_TAG = "engine"


def config_fingerprint(cfg: BaseModel, exclude: set[str]) -> str:
    """16 hex characters of the sha256 of `cfg` (JSON dump, keys sorted) without the top-level keys `exclude`."""
    content = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def resume_point(runtime: Runtime, fingerprint: str) -> Path | None:
    """The runtime's latest complete checkpoint (None: start from scratch). A checkpoint of another config is an
    InputError naming its folder, raised before any work."""
    latest = runtime.latest_checkpoint()
    if latest is None:
        return None
    saved = json.loads((Path(latest) / CLIENT_STATE).read_text())
    if saved["fingerprint"] != fingerprint:
        raise InputError(f"{latest}: checkpoint of another config (fingerprint {saved['fingerprint']}, "
                         f"this config {fingerprint})")
    return Path(latest)


def save_checkpoint(engine, runtime: Runtime, step: int, fingerprint: str, metrics: dict[str, float],
                    extra: dict | None = None) -> None:
    """Every rank saves its part of `engine` into the checkpoint folder of `step`; rank 0 writes the client state
    ({step, fingerprint, **extra}); after a barrier the runtime commits the checkpoint with `metrics`."""
    directory = runtime.checkpoint_dir(step)
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG)
    if runtime.rank == 0:
        (directory / CLIENT_STATE).write_text(json.dumps({"step": step, "fingerprint": fingerprint, **(extra or {})}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    runtime.commit_checkpoint(directory, step, metrics)


def load_checkpoint(engine, directory: Path) -> dict:
    """Restore `engine` (weights, optimizer, LR schedule) from `directory`; its client state ({step, fingerprint,
    ...})."""
    engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
    return json.loads((Path(directory) / CLIENT_STATE).read_text())
