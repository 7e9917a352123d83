"""The strict base model every typed config of every stage derives from, and the optimizer config every training
stage shares."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat

# the floor of the cosine decay, as a share of lr
LrFloor = Annotated[float, Field(ge=0, le=1, description="floor of the cosine decay as a share of lr")]


class StrictModel(BaseModel):
    """Base of all config models: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(StrictModel):
    """AdamW and its LR schedule (`fmrilm_core.engine`: linear warmup, then cosine decay to `min_lr_ratio` x lr or
    constant), and gradient clipping. The defaults are stages 2 and 3's (`llm_train`); a stage with other defaults
    subclasses it and re-declares only those, with the same types (stage 1: `tokenizer_train.config.TokenizerOptim`),
    so a partial YAML section (`optim: {lr: 1.0e-3}`) keeps the stage's own defaults for the rest."""

    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: NonNegativeInt = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: LrFloor = 0.1
    grad_clip: PositiveFloat = 1.0
