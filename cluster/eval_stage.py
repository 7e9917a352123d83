"""The eval stage as the CLI runs it and the pipeline can: `llm_train.task_eval.evaluate_tasks` inside an MLflow
run (figures as metrics `<task>/<protocol>/<metric>`, the output folder as artifacts, lineage to the model's run)."""

from __future__ import annotations

import math
from pathlib import Path

from cluster.config import PipelineConfig
from cluster.pipeline import StageResult
from cluster.tracking import StageRun, Tracker


def run_eval(cfg: PipelineConfig, model: Path, corpus: Path, out: Path, tracker: Tracker,
             parent: StageRun | None = None, input_run_id: str | None = None, *, tasks: list[str] | None = None,
             shots: tuple[int, ...] = (0,), max_test: int | None = None, examples: int = 4,
             train_n: tuple[int, ...] = ()) -> StageResult:
    """Evaluate the model folder `model` on the test split of `corpus` into `out` (metrics.json, predictions.json,
    eval.json, report.html). `train_n`: few-shot fine-tuning on N train subjects per task with the config's
    `instruct` section (its steps), scored as `train_n_<N>`. Summary: the flat `<task>/<protocol>/<metric>` figures."""
    from llm_train.task_eval import evaluate_tasks

    params = {"model": str(model), "corpus": str(corpus), "tasks": ",".join(tasks or ["all"]),
              "shots": ",".join(str(k) for k in shots), "train_n": ",".join(str(n) for n in train_n),
              "max_test": max_test, "seed": cfg.seed}
    with tracker.run("eval", parent=parent, params=params, input_run_id=input_run_id) as run:
        metrics = evaluate_tasks(model, corpus, out, tasks=tasks, shots=shots, seed=cfg.seed, max_test=max_test,
                                 examples=examples, train_n=train_n, instruct_cfg=cfg.instruct)
        summary = flat_metrics(metrics)
        run.log_metrics({k: v for k, v in summary.items() if math.isfinite(v)})
        for name in ("metrics.json", "predictions.json", "eval.json", "report.html"):
            if (Path(out) / name).is_file():
                run.log_artifact(Path(out) / name)
        return StageResult("eval", Path(out), run.run_id, summary)


def flat_metrics(metrics: dict) -> dict[str, float]:
    flat = {}
    for task, entry in metrics.items():
        for protocol, figures in entry.items():
            if isinstance(figures, dict):
                for name, value in figures.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        flat[f"{task}/{protocol}/{name}"] = float(value)
    return flat
