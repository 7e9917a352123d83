"""Typed config of `fmrilm eval` and the pipeline's eval stage (`evaluation.task_eval`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fmrilm_core.config import StrictModel


class EvalConfig(StrictModel):
    """Which tasks, which protocols."""

    tasks: list[Literal["sex", "age", "fluid_intelligence", "ad", "adhd", "asd"]] | None = Field(
        None, description="None = every task; those whose label the corpus lacks are skipped and reported")
    shots: list[int] = Field(default_factory=lambda: [0, 2],
                             description="in-context examples per prompt (0 = zero-shot), from train subjects only")
    train_n: list[int] = Field(default_factory=list, description="few-shot fine-tuning: tune a copy of the model on "
                                                                 "N class-balanced train subjects per task")
    tuned: bool = Field(False, description="fully tuned: tune a copy of the model on every train scan of each task")
    tuned_epochs: float = Field(1.0, gt=0, description="passes of the tuned fine-tuning over every labelled train "
                                                       "scan of the task (steps = epochs x scans / batch size)")
    finetune_steps: int | None = Field(None, ge=1, description="steps of the train_n fine-tuning (the instruct "
                                                               "section's other settings); None = its steps")
    regression_decoding: Literal["greedy", "expected"] = Field(
        "greedy", description="greedy: constrained greedy decoding of a number; expected: the probability-weighted "
                              "mean over a grid of train-split values scored as answers")
    temperature_scaling: bool = Field(True, description="fit a temperature on the val split's scans and report the "
                                                        "ECE after it beside the ECE before")
    max_test: int | None = Field(None, ge=1, description="score at most this many test scans per task")
    examples: int = Field(4, ge=0, description="test scans whose generated description the report shows")

    @model_validator(mode="after")
    def _counts(self) -> EvalConfig:
        if any(k < 0 for k in self.shots) or any(n < 1 for n in self.train_n):
            raise ValueError("shots must be >= 0 and train_n >= 1")
        return self
