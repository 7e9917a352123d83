"""The instruct stage (stage 3) as the CLI runs it and the pipeline can: `llm_train.instruct.train` through the
generic training launcher (in-process or Ray Train), inside an MLflow run, the model folder logged as artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.config import PipelineConfig, flatten, save_resolved
from cluster.launch import mlflow_logger, run_training
from cluster.pipeline import StageResult
from cluster.tracking import StageRun, Tracker


def run_llm_instruct(cfg: PipelineConfig, model: Path, corpus: Path, out: Path, tracker: Tracker,
                     parent: StageRun | None = None, input_run_id: str | None = None) -> StageResult:
    """Stage 3: instruction-tune the stage-2 folder `model` on the corpus's qa.json items into `out`."""
    from llm_train.instruct import InstructInputs, train

    params = {**flatten(cfg.instruct), "workers": cfg.workers}
    with tracker.run("instruct", parent=parent, params=params, input_run_id=input_run_id) as run:
        save_resolved(cfg, out)
        metrics = run_training(train, cfg.instruct, InstructInputs(model, corpus, out), workers=cfg.workers,
                               log_fn=mlflow_logger(tracker, run.run_id), storage=out / "ray", name="instruct")
        summary = {k.removeprefix("val/"): v for k, v in metrics.items()}
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        for item in sorted(out.iterdir()):
            if item.name not in {"checkpoints", "ray"}:
                run.log_artifact(item)
        return StageResult("instruct", out, run.run_id, summary)
