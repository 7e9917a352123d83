"""The trainable whole of stage 1 and its DeepSpeed engine: `Stage1` (tokenizer, domain classifier, SigLIP
heads in one module), the engine's config and LR schedule, and `optimize`, one step on inputs already on the
device. Needs torch, DeepSpeed and pydantic only (no corpus, no MLflow), so the GPU step benchmark
(`bench/tokenizer_step.py --synthetic`) runs it on a bare accelerator machine; `train.py` feeds it from the corpus.

Every trainable part lives in `Stage1`, so the DeepSpeed optimizer provably holds all of them (the reference
implementation left its projection heads out of the optimizer); the classifier gets its own parameter group with
a faster learning rate (`param_groups`). The LLM embedding matrix and the caption encoder are frozen and live
outside the engine.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
    ds = json.loads(Path(cfg.deepspeed).read_text()) if cfg.deepspeed else {"zero_optimization": {"stage": 0}}
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay,
            # torch's AdamW on every device: DeepSpeed's FusedAdam and CPU Adam are extensions built at run time
            # (nvcc or a C++ toolchain on every node), and stage 1's few million parameters make the optimizer
            # step a small share of a step
            "torch_adam": True}},
        "steps_per_print": ds.get("steps_per_print", 10**9),
    })
    ds.pop("train_batch_size", None)
    if "bf16" not in ds and "fp16" not in ds:  # a DeepSpeed JSON that sets the precision itself wins
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
        ds["bf16"] = {"enabled": bf16}
    return ds


def lr_lambda(cfg: TokenizerTrainConfig):
    def factor(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / cfg.optim.warmup_steps
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = (step - cfg.optim.warmup_steps) / max(1, cfg.steps - cfg.optim.warmup_steps)
        floor = cfg.optim.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def init_distributed() -> None:
    """A process group for DeepSpeed: gloo on CPU, nccl on GPU; a 1-process group when nobody set one up
    (torchrun and Ray Train set one up before the stage runs; DeepSpeed then wraps it)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_engine(module: Stage1, cfg: TokenizerTrainConfig):
    """(DeepSpeed engine, its optimizer) over every trainable parameter of `module`."""
    init_distributed()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, cfg),
        config=deepspeed_config(cfg), lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine, optimizer


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
