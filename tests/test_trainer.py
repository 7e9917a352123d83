"""The training loop every stage runs (`fmrilm_core.trainer`), on a real DeepSpeed engine (CPU, gloo) over a tiny
regression with dropout: when it validates, logs and checkpoints, and that a killed run resumes at the right step
and ends exactly where the uninterrupted run did."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmrilm_core.checkpoint import CLIENT_STATE, load_checkpoint, resume_point
from fmrilm_core.engine import build_engine, deepspeed_config, lr_lambda
from fmrilm_core.runtime import LocalRuntime, _Silent
from fmrilm_core.trainer import engine_step, fit

FINGERPRINT = "0123456789abcdef"
TRUE_W = torch.tensor([1.0, -2.0, 0.5, 3.0])


class Tiny(nn.Module):
    """A linear regression behind dropout (so the per-step seed matters): forward(batch) -> its losses."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.lin = nn.Linear(4, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.lin(self.drop(batch["x"])).squeeze(-1)
        return {"loss": F.mse_loss(pred, batch["y"]), "mae": (pred - batch["y"]).abs().mean()}


def batch(step: int) -> dict[str, torch.Tensor]:
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1000 + step))
    return {"x": x, "y": x @ TRUE_W}


VAL = batch(-1)


class Recorder(LocalRuntime):
    """A LocalRuntime keeping every checkpoint and noting what the loop logged, committed and reported."""

    def __init__(self, root, stop: int | None = None):
        self.logged: list[tuple[int, dict]] = []
        self.commits: list[tuple[int, dict]] = []
        self.progress_calls: list[tuple] = []
        super().__init__(root, lambda metrics, step: self.logged.append((step, metrics)), keep=100,
                         progress_fn=lambda *args: self.progress_calls.append(args) or _Silent())
        self.stop = stop

    def commit_checkpoint(self, directory, step, metrics):
        super().commit_checkpoint(directory, step, metrics)
        self.commits.append((step, metrics))
        if step == self.stop:
            raise KeyboardInterrupt  # killed right after this checkpoint


def run(runtime, *, steps=7, eval_every=3, checkpoint_every=2, log_every=3):
    """What a stage does: the resume point first, then the engine, restored; then `fit`. Returns (metrics, losses,
    engine, the steps trained, the number of validations)."""
    latest = resume_point(runtime, FINGERPRINT)
    torch.manual_seed(0)
    module = Tiny()
    ds = deepspeed_config(None, micro_batch=4, grad_clip=1.0, lr=0.05, betas=(0.9, 0.95), weight_decay=0.0,
                          precision="fp32")
    engine, _ = build_engine(module, list(module.parameters()), ds,
                             lr_lambda(warmup_steps=2, total_steps=steps, schedule="cosine", min_lr_ratio=0.1))
    start = load_checkpoint(engine, latest)["step"] if latest is not None else 0
    trained: list[int] = []
    validations: list[int] = []

    def step(i):
        trained.append(i)
        return engine_step(engine, batch, 7, i, runtime.rank)

    @torch.no_grad()
    def validate():
        validations.append(len(trained))
        engine.module.eval()
        out = {"val/mse": float(engine.module({k: v.to(engine.device) for k, v in VAL.items()})["loss"])}
        engine.module.train()
        return out

    metrics, losses = fit(engine, runtime, name="tiny", steps=steps, start=start, step=step, validate=validate,
                          fingerprint=FINGERPRINT, eval_every=eval_every, checkpoint_every=checkpoint_every,
                          log_every=log_every, extra={"note": "kept"})
    return metrics, losses, engine, trained, validations


def test_validates_logs_and_checkpoints_at_their_cadence_and_at_the_end(tmp_path):
    runtime = Recorder(tmp_path / "ckpt")
    metrics, losses, engine, trained, validations = run(runtime)
    assert trained == list(range(7))
    assert validations == [3, 6, 7]  # every eval_every steps, and after the last
    assert [step for step, _ in runtime.commits] == [2, 4, 6, 7]  # every checkpoint_every steps, and at the end
    assert runtime.progress_calls == [("tiny: steps", 7, 0, 0)]
    train_logs = [step for step, m in runtime.logged if "train/loss" in m]
    assert train_logs == [0, 3, 6]  # every log_every steps and the last
    assert all(set(m) == {"train/loss", "train/mae", "train/lr"} for _, m in runtime.logged if "train/loss" in m)
    val_logs = [(step, m) for step, m in runtime.logged if "val/mse" in m]
    assert [step for step, _ in val_logs] == [2, 5, 6] and val_logs[-1][1] == metrics
    # a checkpoint carries the step's train losses with the last validation, the fingerprint and the extra state
    last_step, last = runtime.commits[-1]
    assert last["val/mse"] == metrics["val/mse"] and last["train/loss"] == pytest.approx(float(losses["loss"]))
    assert runtime.commits[0][1].keys() == {"train/loss", "train/mae"}  # nothing validated yet at step 2
    state = json.loads((runtime.latest_checkpoint() / CLIENT_STATE).read_text())
    assert state == {"step": 7, "fingerprint": FINGERPRINT, "note": "kept"}
    assert set(losses) == {"loss", "mae"} and not losses["loss"].requires_grad


def test_a_killed_run_resumes_at_its_checkpoint_and_ends_where_the_uninterrupted_run_did(tmp_path):
    whole_metrics, whole_losses, whole, _, _ = run(Recorder(tmp_path / "whole"))

    with pytest.raises(KeyboardInterrupt):
        run(Recorder(tmp_path / "killed", stop=4))
    runtime = Recorder(tmp_path / "killed")
    assert runtime.latest_checkpoint().name == "step_00000004"
    metrics, losses, resumed, trained, validations = run(runtime)
    assert trained == [4, 5, 6]  # steps 0-3 were not trained again
    assert validations == [2, 3]  # after step 6 (every 3) and at the end
    assert runtime.progress_calls == [("tiny: steps", 7, 4, 0)]
    assert min(step for step, _ in runtime.logged) >= 4
    assert metrics == whole_metrics
    assert torch.equal(losses["loss"], whole_losses["loss"])
    for a, b in zip(resumed.module.parameters(), whole.module.parameters()):
        assert torch.equal(a, b)


def test_a_run_resumed_at_its_end_trains_nothing_and_validates_what_was_saved(tmp_path):
    first_metrics, _, _, _, _ = run(Recorder(tmp_path / "ckpt"))
    runtime = Recorder(tmp_path / "ckpt")
    metrics, losses, _, trained, validations = run(runtime)
    assert trained == [] and losses == {}
    assert validations == [0] and metrics == first_metrics  # the saved weights, measured again
    assert runtime.commits == [] and runtime.logged == []  # no checkpoint rewritten, nothing logged as trained
