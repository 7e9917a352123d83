"""Evaluation: the paper's tasks scored on a stage-2 or stage-3 folder, beside two baselines, every figure with an
interval (docs/evaluation.md).

    config.py      EvalConfig: which tasks and protocols (`eval` section)
    tasks.py       the paper's tasks from a corpus's phenotypes
    protocols.py   zero-shot, k-shot, train_n and tuned: examples, their order, fine-tunings keyed by their inputs
    baselines.py   the FC baseline and the stage-1 probe on the same scans
    metrics.py     figures from log-odds or values, bootstrap intervals over subjects (fmrilm_core.bootstrap),
                   paired differences
    task_eval.py   `evaluate_tasks`: lineage check, every task and protocol, metrics.json / eval.json
    report.py      report.html: the summary table with intervals, per-task detail, ROC bands

Sits above `llm_train` (a model answers through `llm_train.scoring`, fine-tunings train through
`llm_train.instruct`); never imports `cluster`, ray or mlflow.
"""
