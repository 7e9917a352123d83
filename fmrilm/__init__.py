"""fmrilm: the user-facing entry of fMRI-LM. It runs where the user (or a job's driver) runs a command: a laptop,
a login node, the head node of a Ray cluster.

Public API:
- `fmrilm.cli.app`: the `fmrilm` command line (`python -m fmrilm.cli`);
- `fmrilm.stage`: the stage contract (`Stage`, `StageContext`, `StageResult`, `Registry`, `run_stage`);
- `fmrilm.stages.REGISTRY`: the built-in stages in pipeline order, and their adapters (`run_synth`,
  `run_corpus_build`, `run_timeseries`, `run_training_stage`, `run_eval`, `with_corpus_sizes`, `flat_metrics`);
- `fmrilm.pipeline.run_pipeline` / `summary_table`, over `fmrilm.runner` (`run_stages`, `StageRunner`, `stage_key`,
  `stage_modes`, `read_record`, the MLflow tags);
- `fmrilm.ablations` (`variant_config`, `run_ablations`), `fmrilm.config` (`PipelineConfig`, `load_config`),
  `fmrilm.tracking` (`Tracker`, `tracker_for`, `mlflow_logger`), `fmrilm.progress` (`progress_bar`,
  `StepReporter`, `step_reporter`).

It drives the stage libraries (corpus_builder, tokenizer_train, llm_train, evaluation) and starts work through
the launchers of `cluster` (Ray Train, Ray Jobs), which never import it back.
"""
