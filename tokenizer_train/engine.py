"""The trainable whole of stage 1 and its DeepSpeed engine: `Stage1` (tokenizer, domain classifier, SigLIP
heads in one module), its parameter groups, the engine's config and LR schedule for this stage (thin wrappers of
the shared `fmrilm_core.engine`), and `optimize`, one step on inputs already on the device. Needs torch,
DeepSpeed and pydantic only (no corpus, no MLflow), so the GPU step benchmark
(`bench/tokenizer_step.py --synthetic`) runs it on a bare accelerator machine; `train.py` feeds it from the corpus.

Every trainable part lives in `Stage1`, so the DeepSpeed optimizer provably holds all of them (the reference
implementation left its projection heads out of the optimizer); the classifier gets its own parameter group with
a faster learning rate (`param_groups`). The LLM embedding matrix and the caption encoder are frozen and live
outside the engine.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fmrilm_core.engine as core
from tokenizer_train.config import TokenizerTrainConfig
from tokenizer_train.losses import DomainClassifier, ScanEmbedding, SigLipLoss, domain_loss, moment_matching_loss
from tokenizer_train.model import BrainTokenizer
from tokenizer_train.text import CaptionProjection


class Stage1(nn.Module):
    """Everything stage 1 trains; `forward` returns the losses of one batch."""

    def __init__(self, cfg: TokenizerTrainConfig, caption_dim: int, roi_gradients: np.ndarray | None = None,
                 roi_groups: np.ndarray | None = None, caption_center: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.tokenizer = BrainTokenizer(m, roi_gradients=roi_gradients)
        self.domain = DomainClassifier(m.llm_dim, cfg.loss.domain_hidden)
        self.siglip = SigLipLoss()
        groups = torch.as_tensor(roi_groups) if roi_groups is not None else 16
        self.scan_proj = ScanEmbedding(m.n_rois, m.code_dim, cfg.loss.contrastive_dim, groups)
        self.caption_proj = CaptionProjection(caption_dim, cfg.loss.contrastive_dim)
        if caption_center is not None:  # the train captions' mean embedding (TextSide.caption_mean)
            self.caption_proj.set_center(caption_center)

    def forward(self, x: torch.Tensor, caption_emb: torch.Tensor, text_emb: torch.Tensor, lam: float,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        w = self.cfg.loss
        out = self.tokenizer(x, text_emb if w.domain > 0 or w.moments > 0 else None)
        losses = {"reconstruction": F.mse_loss(out.recon.float(), x.float()), "commitment": out.commit_loss}
        total = w.reconstruction * losses["reconstruction"] + w.commitment * losses["commitment"]
        if w.domain > 0 or w.moments > 0:
            latents = out.llm_latents.reshape(-1, out.llm_latents.shape[-1])
            pick = torch.randint(len(latents), (min(len(latents), len(text_emb)),), generator=generator)
        if w.domain > 0:
            noise = w.domain_noise if self.training else 0.0
            losses["domain"], losses["domain_accuracy"] = domain_loss(self.domain, latents[pick], out.text_view, lam,
                                                                      noise)
            total = total + w.domain * losses["domain"]
        if w.moments > 0:
            losses["moments"] = moment_matching_loss(latents[pick], out.text_view)
            total = total + w.moments * lam * losses["moments"]  # ramped in like the adversary (DANN schedule)
        if w.contrastive > 0:
            losses["siglip"] = self.siglip(self.scan_proj(out.pre_quant), self.caption_proj(caption_emb))
            total = total + w.contrastive * losses["siglip"]
        losses["loss"] = total
        losses.update({f"vq_{k}": torch.as_tensor(float(v)) for k, v in out.vq_stats.items()})
        return losses


def deepspeed_config(cfg: TokenizerTrainConfig) -> dict:
    """The engine's config for stage 1 (`fmrilm_core.engine.deepspeed_config` with this config's numbers)."""
    o = cfg.optim
    return core.deepspeed_config(cfg.deepspeed, micro_batch=cfg.batch_size, grad_clip=o.grad_clip, lr=o.lr,
                                 betas=o.betas, weight_decay=o.weight_decay, precision=cfg.precision)


def lr_lambda(cfg: TokenizerTrainConfig):
    """Stage 1's LR factor per step (warmup, then cosine or constant; `fmrilm_core.engine.lr_lambda`)."""
    o = cfg.optim
    return core.lr_lambda(warmup_steps=o.warmup_steps, total_steps=cfg.steps, schedule=o.schedule,
                          min_lr_ratio=o.min_lr_ratio)


def build_engine(module: Stage1, cfg: TokenizerTrainConfig):
    """(DeepSpeed engine, its optimizer) over every trainable parameter of `module`."""
    return core.build_engine(module, param_groups(module, cfg), deepspeed_config(cfg), lr_lambda(cfg))


def param_groups(module: Stage1, cfg: TokenizerTrainConfig) -> list[dict]:
    """Every trainable parameter, the domain classifier in a group of its own at ``optim.domain_lr_scale`` x lr.

    With one learning rate the adversarial game oscillates: the encoder pushes the latents past the classifier's
    boundary before it re-fits, and the classifier's accuracy swings 0.35-0.75 around chance (the cycles of
    simultaneous gradient play). A faster classifier (two time-scale updates, Heusel et al. 2017) stays near
    its best response, so the encoder descends a loss that really measures how separable the domains are.
    The LR schedule multiplies each group's own rate, so the ratio holds through warmup and decay.
    """
    domain = {id(p) for p in module.domain.parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in domain]}]
    if cfg.loss.domain > 0:
        groups.append({"params": [p for p in trainable if id(p) in domain],
                       "lr": cfg.optim.lr * cfg.optim.domain_lr_scale})
    else:  # no domain loss: the classifier is never used, keep it in the optimizer at the base rate
        groups[0]["params"] += [p for p in trainable if id(p) in domain]
    return groups


def optimize(engine, x: torch.Tensor, caption_emb: torch.Tensor, text_emb: torch.Tensor, lam: float,
             generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One optimizer step of `engine` on one batch already on its device; the detached losses."""
    engine.train()
    losses = engine(x, caption_emb, text_emb, lam, generator)
    engine.backward(losses["loss"])
    engine.step()
    return {k: v.detach() for k, v in losses.items()}
