"""The training loop of every stage, written once (docs/design.md): `fit` runs the steps of a DeepSpeed engine from a
resume point, logs, reports progress, validates and checkpoints; `engine_step` is one optimizer step of the engines
of stages 2 and 3 (stage 1 has its own step, `tokenizer_train.engine.optimize`, called through the same loop).

What stays in a stage: its batches, its loss (the engine's forward), its validation, and the resume point, which a
stage finds (`fmrilm_core.checkpoint.resume_point`) before any heavy setup, so a checkpoint of another config is
refused before any model loads; the stage then builds its engine, restores it (`load_checkpoint`) and hands `fit`
the step it reached.

    for i in start .. steps-1:  losses = step(i)
        every `log_every` steps and at the last: train/<loss> and train/lr logged (rank 0)
        progress.update(i + 1, loss=...)
        every `eval_every` steps and at the end: validate() logged
        every `checkpoint_every` steps and at the end: checkpoint (train losses + last validation, `extra` state)
    resumed at the end (nothing trained): validate() what the checkpoint holds

Every random draw of a step is seeded by (seed, step, rank) (`seed_step`), so a resumed run repeats the steps an
uninterrupted one would have taken.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fmrilm_core.checkpoint import save_checkpoint
from fmrilm_core.runtime import Runtime

Losses = dict[str, torch.Tensor]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global generator for step `step` of rank `rank` (dropout, sampling inside the step)."""
    torch.manual_seed(seed * 1_000_003 + step * 101 + rank)


def engine_step(engine, batch: Callable[[int], Mapping[str, torch.Tensor]], seed: int, step: int,
                rank: int) -> Losses:
    """One optimizer step of a DeepSpeed engine whose forward takes a dict of tensors and returns its losses
    (`"loss"` is the one minimised): the step seeded, batch `batch(step)` drawn under that seed and moved to the
    engine's device; the detached losses."""
    seed_step(seed, step, rank)
    inputs = {k: v.to(engine.device) for k, v in batch(step).items()}
    engine.train()
    losses = engine(inputs)
    engine.backward(losses["loss"])
    engine.step()
    return {k: v.detach() for k, v in losses.items()}


def train_losses(losses: Losses) -> dict[str, float]:
    """The default logged form of a step's losses: `train/<name>` of each."""
    return {f"train/{k}": float(v) for k, v in losses.items()}


def fit(engine, runtime: Runtime, *, name: str, steps: int, start: int, step: Callable[[int], Losses],
        validate: Callable[[], dict[str, float]], fingerprint: str, eval_every: int, checkpoint_every: int,
        log_every: int = 10, extra: dict | None = None,
        logged: Callable[[Losses], dict[str, float]] = train_losses) -> tuple[dict[str, float], Losses]:
    """Train `engine` from step `start` (0, or the step of the checkpoint it was restored from) to `steps`.

    `step(i)`: one optimizer step, its detached losses (`"loss"` among them); `validate()`: the validation
    metrics of the engine now; `logged(losses)`: what of a step's losses is logged and stored with a checkpoint
    (`train/<name>` of each by default). Progress goes to `runtime.progress(f"{name}: steps", ...)`. Checkpoints carry
    the config `fingerprint` and the client state `extra` (`fmrilm_core.checkpoint.save_checkpoint`).

    Returns (the last validation metrics, the last step's losses: {} when nothing was trained). A run resumed at
    its end trains nothing and validates what it restored.
    """
    metrics: dict[str, float] = {}
    losses: Losses = {}
    with runtime.progress(f"{name}: steps", steps, start) as progress:
        for i in range(start, steps):
            losses = step(i)
            done = i + 1
            if runtime.rank == 0 and (i % log_every == 0 or done == steps):  # float() syncs: only when logged
                runtime.log(logged(losses) | {"train/lr": engine.get_lr()[0]}, i)
            progress.update(done, loss=losses["loss"])
            if done % eval_every == 0 or done == steps:
                metrics = validate()
                runtime.log(metrics, i)
            if done % checkpoint_every == 0 or done == steps:
                save_checkpoint(engine, runtime, done, fingerprint, logged(losses) | metrics, extra=extra)
    if not metrics:  # resumed at the end: nothing trained, validate what was saved
        metrics = validate()
    return metrics, losses
