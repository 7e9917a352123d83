"""Stage 1 training: `train(cfg, TokenizerInputs(corpus, out), runtime)`, the loop every stage shares
(`fmrilm_core.trainer.fit`: train_step / validate / checkpoint) with resume as the first thing it does (torchtitan
style). The same code runs in one process, under torchrun and inside Ray Train workers: the caller sets up the
process group environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and hands in a `Runtime`.

This module feeds the engine (`engine.py`: `Stage1`, everything stage 1 trains, and its DeepSpeed engine) from
the corpus readers and the frozen text side (`TextSide`: the LLM's token embeddings and the caption encoder).
Checkpoint save / resume with the config fingerprint and the gathering of ZeRO-3 parameters are the shared ones
of `fmrilm_core`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corpus_builder.lineage import stage_lineage
from corpus_builder.readers import read_reference, roi_network_groups
from fmrilm_core.checkpoint import config_fingerprint, load_checkpoint, resume_point
from fmrilm_core.engine import gathered
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import write_lineage
from fmrilm_core.model_card import write_model_card
from fmrilm_core.runtime import Runtime
from fmrilm_core.trainer import fit, seed_step
from tokenizer_train.config import TokenizerTrainConfig
from tokenizer_train.data import ScanBatches
from tokenizer_train.engine import Stage1, build_engine, optimize
from tokenizer_train.losses import dann_lambda, domain_loss, probe_accuracy, retrieval_recall
from tokenizer_train.text import (
    DEFAULT_TEXT_CORPUS,
    CaptionEncoder,
    TextEmbeddingSampler,
    load_llm,
    read_text_corpus,
)

# what a checkpoint does not depend on: the run length and the checkpoint / evaluation cadence
FINGERPRINT_EXCLUDE = {"steps", "checkpoint_every", "eval_every"}


class TextSide:
    """The frozen language side: text-token embeddings of the target LLM and caption embeddings."""

    def __init__(self, cfg: TokenizerTrainConfig, corpus: Path, train: ScanBatches):
        llm = load_llm(cfg.text.llm, cfg.text.llm_gguf, with_model=cfg.text.caption_encoder == "llm")
        if llm.embeddings.shape[1] != cfg.model.llm_dim:
            raise InputError(f"model.llm_dim is {cfg.model.llm_dim} but the LLM's embeddings are "
                             f"{llm.embeddings.shape[1]}-d")
        if cfg.text.text_corpus == "captions":
            texts, source = list(train.caption_of.values()), f"captions of {corpus}"
        else:
            path = cfg.text.text_corpus or DEFAULT_TEXT_CORPUS
            texts, source = read_text_corpus(path), str(path)
        self.sampler = TextEmbeddingSampler.from_corpus(llm.tokenizer, llm.embeddings, texts, source=source)
        self.captions = CaptionEncoder(cfg.text.caption_encoder, llm=llm if cfg.text.caption_encoder == "llm" else None)
        self.caption_mean = self.captions.encode(list(train.caption_of.values())).mean(0)  # also fills the cache

    def text_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.sampler.sample(n, generator)

    def caption_batch(self, captions: list[str]) -> torch.Tensor:
        return self.captions.encode(captions)


@dataclass(frozen=True)
class TokenizerInputs:
    """What stage 1 reads and writes: the corpus, and the output folder (export in `out/tokenizer`)."""

    corpus: Path
    out: Path


def train(cfg: TokenizerTrainConfig, inputs: TokenizerInputs, runtime: Runtime) -> dict:
    """Train the tokenizer on `inputs.corpus`, export it to `inputs.out/tokenizer`; returns the final validation
    metrics."""
    corpus, out = Path(inputs.corpus), Path(inputs.out)
    lineage = stage_lineage("tokenizer", corpus, None)  # a corpus that cannot say whom it holds fails first
    m = cfg.model
    train_data = ScanBatches(corpus, "train", cfg.batch_size, length=m.length, n_rois=m.n_rois, seed=cfg.seed,
                             rank=runtime.rank, world_size=runtime.world_size)
    val_data = ScanBatches(corpus, "val", cfg.batch_size, length=m.length, n_rois=m.n_rois, seed=cfg.seed)
    fingerprint = config_fingerprint(cfg, FINGERPRINT_EXCLUDE)
    latest = resume_point(runtime, fingerprint)  # refuses a checkpoint of another config before any work
    text = TextSide(cfg, corpus, train_data)

    torch.manual_seed(cfg.seed)
    roi_gradients = None
    if m.roi_embedding == "gradients":  # the corpus's reference gradients, fitted on its reference cohort
        roi_gradients = read_reference(corpus).gradients
    module = Stage1(cfg, text.captions.dim, roi_gradients, roi_network_groups(corpus), text.caption_mean)
    engine, _ = build_engine(module, cfg)
    start = load_checkpoint(engine, latest)["step"] if latest is not None else 0

    metrics, losses = fit(engine, runtime, name="tokenizer", steps=cfg.steps, start=start,
                          step=lambda step: train_step(engine, cfg, text, train_data, step),
                          validate=lambda: validate(engine.module, cfg, text, val_data), fingerprint=fingerprint,
                          eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)

    with gathered(engine.module):
        if runtime.rank == 0:
            engine.module.tokenizer.save_pretrained(out / "tokenizer")
            write_lineage(out / "tokenizer", lineage)
            write_model_card(out / "tokenizer", kind="tokenizer", title="fMRI-LM stage 1 (brain tokenizer)",
                             summary="Turns a scan's ROI time series into discrete brain tokens whose codebook lives "
                                     "in the target LLM's embedding space.", lineage=lineage,
                             config=cfg.model_dump(mode="json"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics | {"final_loss": float(losses["loss"]) if losses else float("nan")}


def train_step(engine, cfg: TokenizerTrainConfig, text: TextSide, data: ScanBatches, step: int) -> dict:
    """One optimizer step of stage 1 (`tokenizer_train.engine.optimize`) on batch `step`; the detached losses."""
    # every random draw of a step is seeded by (seed, step, rank): a resumed run repeats it exactly
    seed_step(cfg.seed, step, data.rank)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + data.rank)
    x, captions, _ = data.batch(step)
    device = engine.device
    caption_emb = text.caption_batch(captions).to(device)
    text_emb = text.text_batch(cfg.text.text_batch, generator).to(device)
    lam = dann_lambda(step / max(1, cfg.steps - 1), cfg.loss.dann_gamma)
    return optimize(engine, x.to(device), caption_emb, text_emb, lam, generator)


@torch.no_grad()
def validate(module: Stage1, cfg: TokenizerTrainConfig, text: TextSide, data: ScanBatches,
             max_scans: int = 512) -> dict[str, float]:
    """Reconstruction R^2, codebook usage and perplexity, domain accuracy (the adversary's, a fresh linear
    probe's and a fresh MLP probe's, see `probe_accuracy`), SigLIP loss, retrieval R@1/R@5."""
    module.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 12345)
    sse = sst = 0.0
    counts = torch.zeros(cfg.model.codebook_size)
    scans, caps, domain_acc, siglip, probe_latents, probe_text = [], [], [], [], [], []
    device = module.tokenizer.patch_embed.weight.device
    with gathered(module):
        for x, captions, _ in data.all(max_scans):
            x = x.to(device)
            out = module.tokenizer(x, text.text_batch(cfg.text.text_batch, generator).to(device))
            sse += float(((out.recon.float() - x) ** 2).sum())
            sst += float(((x - x.mean(dim=(1, 2), keepdim=True)) ** 2).sum())
            counts += torch.bincount(out.codes.flatten().cpu(), minlength=cfg.model.codebook_size).float()
            latents = out.llm_latents.reshape(-1, out.llm_latents.shape[-1])
            pick = torch.randint(len(latents), (min(len(latents), len(out.text_view)),), generator=generator)
            domain_acc.append(float(domain_loss(module.domain, latents[pick], out.text_view, 0.0)[1]))
            probe_latents.append(latents[pick[:256]].cpu())
            probe_text.append(out.text_view[:256].cpu())
            caption_emb = module.caption_proj(text.caption_batch(captions).to(device))
            gather, module.siglip.gather = module.siglip.gather, False  # ranks may hold different val batches
            scan_emb = module.scan_proj(out.pre_quant)
            siglip.append(float(module.siglip(scan_emb, caption_emb)))
            module.siglip.gather = gather
            scans.append(scan_emb)
            caps.append(caption_emb)
    module.train()
    p = counts / counts.sum()
    recall = retrieval_recall(torch.cat(scans), torch.cat(caps), ks=(1, 5))
    probe_latents, probe_text = torch.cat(probe_latents), torch.cat(probe_text)
    n = len(torch.cat(scans))
    return {"val/reconstruction_r2": 1 - sse / max(sst, 1e-12),
            "val/codebook_usage": float((counts > 0).float().mean()),
            "val/codebook_perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
            "val/domain_accuracy": float(np.mean(domain_acc)),
            "val/domain_probe_accuracy": probe_accuracy(probe_latents, probe_text, cfg.seed),
            "val/domain_mlp_probe_accuracy": probe_accuracy(probe_latents, probe_text, cfg.seed, kind="mlp"),
            "val/siglip": float(np.mean(siglip)),
            "val/retrieval_r1": float(recall["R@1"]), "val/retrieval_r5": float(recall["R@5"]),
            "val/retrieval_chance_r5": min(1.0, 5 / n), "val/scans": float(n)}
