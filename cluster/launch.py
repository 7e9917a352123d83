"""Running a training stage: in-process (also each rank under torchrun), or as a Ray Train `TorchTrainer`.

A stage is a plain function `train(cfg, inputs, runtime)` whose typed `inputs` (a small dataclass of the stage:
`TokenizerInputs`, `AlignInputs`, ...) name what it reads and its output folder `inputs.out`; one generic
`run_training` runs any of them and supplies the runtime, its checkpoints laid out under `inputs.out` (`checkpoint_step`
reads that layout):
- `LocalRuntime` (fmrilm_core.runtime): checkpoints in a shared folder, rank-0 logging; used in-process and
  by every rank under `torchrun` (which sets RANK / WORLD_SIZE / MASTER_ADDR for DeepSpeed);
- `RayTrainRuntime`: checkpoints through `ray.train.report` into the run's `storage_path`, resume from
  `ray.train.get_checkpoint()` (so a restarted worker group picks up the last checkpoint), metrics straight to
  MLflow from rank 0.

What a run logs and how it shows progress come from the caller (`log_fn`, `progress_fn`): this module knows
nothing of MLflow or of the command line, and imports nothing of the `fmrilm` entry package.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fmrilm_core.runtime import COMPLETE, LocalRuntime

CHECKPOINTS = "checkpoints"  # in the output folder: an in-process run's checkpoints (one folder per step)
STORAGE = "ray"  # in the output folder: Ray Train's storage (checkpoint_<n> folders per run)
LogFn = Callable[[dict[str, float], int], None]


class RayTrainRuntime(LocalRuntime):
    """LocalRuntime's logging and checkpoint folders (in a worker-local temp dir), but checkpoints are reported
    to Ray Train, which merges every rank's files in the run's storage, and resume comes from Ray."""

    def __init__(self, log_fn: LogFn | None, progress_fn=None):
        import ray.train

        super().__init__(Path(tempfile.mkdtemp(prefix="fmrilm-ckpt-")), log_fn, progress_fn=progress_fn)
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def commit_checkpoint(self, directory: Path, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        (directory / COMPLETE).write_text(str(step))
        # every rank reports its own files (DeepSpeed names them per rank); Ray merges them in storage
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None


def run_training(train_fn, cfg, inputs, *, workers: int, log_fn: LogFn | None, name: str,
                 storage: Path | None = None, progress_fn=None, max_failures: int = 2) -> dict:
    """Run `train_fn(cfg, inputs, runtime)` in-process (workers == 0; checkpoints in `inputs.out/checkpoints`) or
    on `workers` Ray Train workers (Ray's storage in `storage`, default `inputs.out/ray`; a failed worker group
    restarts from the last checkpoint, `max_failures` times). `log_fn(metrics, step)` logs from rank 0,
    `progress_fn(stage, total, start, rank)` makes a training loop's progress reporter (a picklable function: it
    travels to the workers)."""
    if workers == 0:
        return train_fn(cfg, inputs, LocalRuntime(Path(inputs.out) / CHECKPOINTS, log_fn, progress_fn=progress_fn))
    storage = Path(inputs.out) / STORAGE if storage is None else storage

    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # workers run elsewhere (another process, another node): relative paths would resolve against their folder
    inputs = dataclasses.replace(inputs, **{f.name: Path(getattr(inputs, f.name)).resolve()
                                            for f in dataclasses.fields(inputs)
                                            if isinstance(getattr(inputs, f.name), Path)})

    def loop(config: dict) -> None:
        from cluster.logs import quiet_third_party

        quiet_third_party()  # a worker is a fresh process: the CLI's start-up quieting did not run there
        train_fn(cfg, inputs, RayTrainRuntime(log_fn, progress_fn))  # the last checkpoint report carries the metrics

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address) if address else ray.init(num_cpus=max(2, workers), include_dashboard=False)
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}


def checkpoint_step(out: Path) -> int | None:
    """The step of the latest complete checkpoint `run_training` left under the output folder `out` (its local
    `checkpoints/`, or Ray Train's storage `ray/`), None when there is none."""
    from fmrilm_core.checkpoint import CLIENT_STATE

    out, steps = Path(out), []
    states = [*out.glob(f"{CHECKPOINTS}/step_*/{CLIENT_STATE}"), *out.glob(f"{STORAGE}/*/checkpoint_*/{CLIENT_STATE}")]
    for state in states:
        if (state.parent / COMPLETE).exists():
            try:
                steps.append(int(json.loads(state.read_text())["step"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return max(steps, default=None)
