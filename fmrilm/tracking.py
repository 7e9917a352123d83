"""MLflow tracking: one parent run per pipeline, one child run per stage, lineage between stages.

The store is `sqlite:///<workdir>/mlflow.db` unless `MLFLOW_TRACKING_URI` (or the config's
`tracking.uri`) says otherwise; artifacts of a sqlite store go to `<workdir>/mlartifacts`.

Everything goes through an explicit `MlflowClient` (no global active run), so stages can run in threads or
Ray workers without stepping on each other. In distributed code only rank 0 writes: `StageRun` methods are
no-ops on other ranks (`is_rank_zero`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from fmrilm.config import PipelineConfig

# after mlflow's import-time logging setup: keep its "creating tables" INFO chatter off our terminals
logging.getLogger("mlflow").setLevel(logging.WARNING)

INPUT_RUN_TAG = "fmrilm.input_run_id"
STAGE_TAG = "fmrilm.stage"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000
_BATCH = 100


def is_rank_zero() -> bool:
    """True in the process that owns logging: rank 0 of torch.distributed / torchrun, or a plain process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0")) == 0


def resolve_uri(workdir: Path, uri: str | None = None) -> str:
    """Config value > $MLFLOW_TRACKING_URI > sqlite store in the workdir."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{workdir.resolve() / 'mlflow.db'}"


class StageRun:
    """A live MLflow run. Methods log on rank 0 and do nothing elsewhere."""

    def __init__(self, client: MlflowClient | None, run_id: str | None):
        self.client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None and is_rank_zero()

    def log_params(self, params: Mapping[str, object]) -> None:
        if not self.active:
            return
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH])

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (a scheduler's cancel, `kill`) raises SystemExit inside the block, so the run is marked FAILED
    instead of staying RUNNING forever. Only in the main thread, and only where nobody else (Ray, torchrun, a
    caller) has installed a handler; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Tracker:
    """Opens runs in one experiment of one tracking store."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        # Nothing touches the store until the first run opens (a command that fails on bad input leaves
        # no database behind), and ranks other than 0 never touch it.
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            with self._store_lock():
                found = self.client.get_experiment_by_name(self.experiment)
                if found is not None:
                    self._experiment_id = found.experiment_id
                else:
                    root = self.artifact_root
                    if root is not None:
                        root.mkdir(parents=True, exist_ok=True)
                    location = root.resolve().as_uri() if root is not None else None
                    self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        return self._experiment_id

    @contextmanager
    def _store_lock(self) -> Iterator[None]:
        """For a sqlite store, an exclusive file lock beside the database while it is first opened: two stages
        started at the same time on a fresh workdir would otherwise both create (migrate) its tables, and one
        fails with "duplicate column name". Other stores handle concurrent clients themselves."""
        if not self.uri.startswith("sqlite:///"):
            yield
            return
        db = Path(self.uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db) + ".lock"):
            yield

    @classmethod
    def for_workdir(cls, workdir: Path, experiment: str, uri: str | None = None) -> Tracker:
        resolved = resolve_uri(Path(workdir), uri)
        root = Path(workdir) / "mlartifacts" if resolved.startswith("sqlite:") else None
        return cls(resolved, experiment, root)

    @contextmanager
    def run(self, name: str, *, parent: StageRun | None = None, params: Mapping[str, object] | None = None,
            input_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
        """A run that ends FINISHED, or FAILED when the body raises. Only rank 0 creates it."""
        if not is_rank_zero():
            yield StageRun(None, None)
            return
        all_tags = {STAGE_TAG: name, **(tags or {})}
        if parent is not None and parent.run_id:
            all_tags[PARENT_TAG] = parent.run_id
        if input_run_id:
            all_tags[INPUT_RUN_TAG] = input_run_id
        experiment_id = self.experiment_id  # first: opening a fresh store takes the lock (and makes its folder)
        info = self.client.create_run(experiment_id, run_name=name, tags=all_tags).info
        run = StageRun(self.client, info.run_id)
        if params:
            run.log_params(params)
        try:
            with _sigterm_raises():
                yield run
        except BaseException:
            self.client.set_terminated(info.run_id, status="FAILED")
            raise
        self.client.set_terminated(info.run_id, status="FINISHED")


def tracker_for(cfg: PipelineConfig, workdir: Path) -> Tracker:
    """The run store of a config: `tracking.uri`, else $MLFLOW_TRACKING_URI, else <workdir>/mlflow.db (single
    commands use the config's workdir too, so every stage of a project lands in one store)."""
    return Tracker.for_workdir(workdir, cfg.tracking.experiment or cfg.name, cfg.tracking.uri)


def mlflow_logger(tracker: Tracker, run_id: str | None):
    """The `log_fn(metrics, step)` of a training runtime: a function that travels to Ray Train workers and opens its
    own client on the same store there (None without a run: nothing to log to)."""
    if run_id is None:
        return None
    uri = tracker.uri

    def log(metrics: dict[str, float], step: int) -> None:
        from mlflow.tracking import MlflowClient

        from fmrilm.tracking import StageRun

        clean = {k.replace("@", "_at_"): v for k, v in metrics.items()}
        StageRun(MlflowClient(uri), run_id).log_metrics(clean, step)

    return log
