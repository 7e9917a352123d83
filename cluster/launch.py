"""Running a training stage: in-process (also each rank under torchrun), or as a Ray Train `TorchTrainer`.

A stage is a plain function `train(cfg, inputs, runtime)` whose typed `inputs` (a small dataclass of the stage:
`TokenizerInputs`, `AlignInputs`, ...) name what it reads and its output folder `inputs.out`; one generic
`run_training` runs any of them and supplies the runtime:
- `LocalRuntime` (fmrilm_core.runtime): checkpoints in a shared folder, rank-0 logging; used in-process and
  by every rank under `torchrun` (which sets RANK / WORLD_SIZE / MASTER_ADDR for DeepSpeed);
- `RayTrainRuntime`: checkpoints through `ray.train.report` into the run's `storage_path`, resume from
  `ray.train.get_checkpoint()` (so a restarted worker group picks up the last checkpoint), metrics straight to
  MLflow from rank 0.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cluster.tracking import Tracker
from fmrilm_core.runtime import COMPLETE, LocalRuntime


class RayTrainRuntime(LocalRuntime):
    """LocalRuntime's logging and checkpoint folders (in a worker-local temp dir), but checkpoints are reported
    to Ray Train, which merges every rank's files in the run's storage, and resume comes from Ray."""

    def __init__(self, log_fn: Callable[[dict[str, float], int], None] | None):
        import ray.train

        super().__init__(Path(tempfile.mkdtemp(prefix="fmrilm-ckpt-")), log_fn, progress_fn=step_reporter)
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


def step_reporter(stage: str, total: int, start: int, rank: int):
    from cluster.progress import StepReporter

    return StepReporter(stage, total=total, start=start, rank=rank)


def mlflow_logger(tracker: Tracker, run_id: str | None) -> Callable[[dict[str, float], int], None] | None:
    """A picklable-enough logging function for workers: opens its own client on the same store."""
    if run_id is None:
        return None
    uri = tracker.uri

    def log(metrics: dict[str, float], step: int) -> None:
        from mlflow.tracking import MlflowClient

        from cluster.tracking import StageRun

        clean = {k.replace("@", "_at_"): v for k, v in metrics.items()}
        StageRun(MlflowClient(uri), run_id).log_metrics(clean, step)

    return log


def run_training(train_fn, cfg, inputs, *, workers: int, log_fn, storage: Path, name: str,
                 max_failures: int = 2) -> dict:
    """Run `train_fn(cfg, inputs, runtime)` in-process (workers == 0; checkpoints in `inputs.out/checkpoints`) or
    on `workers` Ray Train workers (a failed worker group restarts from the last checkpoint, `max_failures` times)."""
    if workers == 0:
        return train_fn(cfg, inputs, LocalRuntime(Path(inputs.out) / "checkpoints", log_fn, progress_fn=step_reporter))

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
        train_fn(cfg, inputs, RayTrainRuntime(log_fn))  # the last checkpoint report carries the metrics

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
