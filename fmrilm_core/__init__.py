"""Training plumbing that more than one stage needs (docs/design.md), in one home that every stage imports.

- `errors`: `InputError`, the one exception type for bad user input.
- `config`: `StrictModel`, the base of every typed config, and `OptimConfig`, the optimizer settings (AdamW, LR
  schedule, clipping) of every training stage, each with its own defaults.
- `runtime`: the `Runtime` protocol a stage is handed and `LocalRuntime`, its local implementation.
- `engine`: the DeepSpeed process group, config, LR schedule and engine builder; `gathered` parameters.
- `checkpoint`: checkpoint save / resume with the config fingerprint.
- `trainer`: the training loop of every stage, written once (`fit`: steps, logging, progress, validation,
  checkpoints, a run resumed at its end), and `engine_step`, one optimizer step of a DeepSpeed engine.
- `llm`: loading a base causal LM from a folder or the shipped SmolLM2 GGUF.
- `lineage`: a saved model's `lineage.json` (the corpus each stage trained on, whom it saw) and the checks that
  keep a trained subject out of a test figure.
- `model_card`: the `README.md` model card of every saved model folder (Hugging Face form).
- `bootstrap`: the percentile bootstrap over subjects behind every interval.

This package imports no stage (`corpus_builder`, `tokenizer_train`, `llm_train`, `evaluation`, `cluster`);
`cluster` supplies the Ray Train runtime on top. Importing it is cheap: torch, DeepSpeed and transformers load only
in the modules (`engine`, `checkpoint`, `trainer`) or functions (`llm`) that need them.
"""
