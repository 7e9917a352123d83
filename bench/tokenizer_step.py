"""Benchmark: stage-1 step time of our loop (DeepSpeed engine + corpus reader + frozen text side) over a bare
PyTorch loop with the same model, batch size and optimizer (AdamW), measured in one process, interleaved.

The bare loop gets its batches, caption embeddings and text-token embeddings ready in memory, so the ratio is
the full cost of our machinery per step. Target: <= 1.15x.

    .venv/bin/python bench/tokenizer_step.py --corpus CORPUS [--steps 20] [--dim 64] [--batch 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tokenizer_train.config import TokenizerTrainConfig
from tokenizer_train.data import ScanBatches
from tokenizer_train.losses import dann_lambda
from tokenizer_train.train import Stage1, TextSide, build_engine, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--deepspeed", type=Path, default=Path("configs/deepspeed/zero2.json"))
    args = parser.parse_args()

    from corpus_builder.readers import ZarrCorpus

    _, t, n = ZarrCorpus(args.corpus).shape
    cfg = TokenizerTrainConfig.model_validate({
        "model": {"length": t, "n_rois": n, "dim": args.dim, "depth": args.depth, "heads": 2,
                  "codebook_size": 512, "code_dim": 32, "decoder_depth": 1},
        "batch_size": args.batch, "steps": 10**6, "deepspeed": str(args.deepspeed), "text": {"text_batch": 1024}})
    data = ScanBatches(args.corpus, "train", cfg.batch_size, length=t, n_rois=n, seed=0)
    text = TextSide(cfg, args.corpus, data)

    torch.manual_seed(0)
    engine, _ = build_engine(Stage1(cfg, text.captions.dim, caption_center=text.caption_mean), cfg)
    torch.manual_seed(0)
    bare = Stage1(cfg, text.captions.dim, caption_center=text.caption_mean)
    opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(0)
    ready = []
    for step in range(args.steps + 2):  # the bare loop's inputs, prepared up front
        x, captions, _ = data.batch(step)
        ready.append((x, text.caption_batch(captions), text.text_batch(cfg.text.text_batch, gen)))

    def bare_step(step: int) -> None:
        x, cap, txt = ready[step]
        losses = bare(x, cap, txt, dann_lambda(0.5, cfg.loss.dann_gamma), torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.optim.grad_clip)
        opt.step()

    ours, theirs = [], []
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        train_step(engine, cfg, text, data, step)
        t1 = time.perf_counter()
        bare_step(step)
        t2 = time.perf_counter()
        if step >= 2:  # skip warm-up (k-means init, first caption encodings)
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
    o, b = float(np.median(ours)), float(np.median(theirs))
    print(f"model: T={t} N={n} dim={args.dim} depth={args.depth} batch={args.batch}; {args.steps} steps, "
          f"{torch.get_num_threads()} threads; {args.deepspeed.name}")
    print(f"ours (DeepSpeed engine + reader + text side): {o * 1000:8.1f} ms/step (median)")
    print(f"bare PyTorch loop (same model/batch/AdamW):   {b * 1000:8.1f} ms/step (median)")
    print(f"ratio ours / bare: {o / b:.3f}   (target <= 1.15)")
    tokens = args.batch * n * int(np.ceil(t / cfg.model.patch))
    print(f"tokens/s ours: {tokens / o:,.0f}")


if __name__ == "__main__":
    main()
