"""Benchmark: stage-1 step time of our loop (DeepSpeed engine + corpus reader + frozen text side) over a bare
PyTorch loop with the same model, batch size and optimizer (AdamW), measured in one process, interleaved.

The bare loop gets its batches, caption embeddings and text-token embeddings ready in memory, so the ratio is
the full cost of our machinery per step. Target: <= 1.15x.

    .venv/bin/python bench/tokenizer_step.py --corpus CORPUS [--steps 20] [--dim 64] [--batch 4]
    python bench/tokenizer_step.py --synthetic --size default [--steps 30]      # on a GPU machine

`--synthetic` needs no corpus, LLM or caption encoder (random scans, caption and text-token embeddings of the
right shapes), so it runs where only torch, DeepSpeed and pydantic are installed; "ours" is then the DeepSpeed
engine alone (no reader). On CUDA the engine runs in bf16 (as training does) and the bare loop under bf16
autocast, and the benchmark also prints tokens/s (fMRI tokens = W x N per scan) and model FLOPs utilisation:
the FLOPs of one forward and backward (torch's FlopCounterMode) per second over the chip's dense bf16 peak.
`--size default` is the stage's default model (450 ROIs, T 160, patch 16, dim 256, depth 4, K 8192, batch 32).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tokenizer_train.config import TokenizerTrainConfig
from tokenizer_train.engine import Stage1, build_engine, optimize
from tokenizer_train.losses import dann_lambda

# dense bf16 peak by the vendors' datasheets (SXM parts), FLOP/s; --peak-tflops overrides
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_config(args, t: int, n: int) -> dict:
    if args.size == "default":
        return {"length": t, "n_rois": n}
    return {"length": t, "n_rois": n, "dim": args.dim, "depth": args.depth, "heads": 2,
            "codebook_size": 512, "code_dim": 32, "decoder_depth": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="a built corpus (the reader and text side are timed too)")
    parser.add_argument("--synthetic", action="store_true", help="random inputs, no corpus/LLM/caption encoder")
    parser.add_argument("--size", choices=["small", "default"], default="small",
                        help="small: --dim/--depth, K 512 (CPU); default: the config's default model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, help="per-step batch (default: 4 small, 32 default size)")
    parser.add_argument("--deepspeed", type=Path, default=Path("configs/deepspeed/zero2.json"))
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the chip for MFU")
    args = parser.parse_args()
    if (args.corpus is None) == (not args.synthetic):
        parser.error("give --corpus CORPUS or --synthetic")
    batch = args.batch or (32 if args.size == "default" else 4)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    if args.synthetic:
        t, n = 160, 450
    else:
        from corpus_builder.readers import ZarrCorpus

        _, t, n = ZarrCorpus(args.corpus).shape
    text_batch = 4096 if args.size == "default" else 1024
    cfg = TokenizerTrainConfig.model_validate({
        "model": model_config(args, t, n), "batch_size": batch, "steps": 10**6,
        "deepspeed": str(args.deepspeed), "text": {"text_batch": text_batch}})
    m = cfg.model

    if args.synthetic:
        caption_dim, caption_center = 384, torch.zeros(384)
        gen = torch.Generator().manual_seed(0)
        inputs = [(torch.randn(batch, t, n, generator=gen), torch.randn(batch, caption_dim, generator=gen),
                   torch.randn(text_batch, m.llm_dim, generator=gen)) for _ in range(4)]
    else:
        from tokenizer_train.data import ScanBatches
        from tokenizer_train.train import TextSide, train_step

        data = ScanBatches(args.corpus, "train", batch, length=t, n_rois=n, seed=0)
        text = TextSide(cfg, args.corpus, data)
        caption_dim, caption_center = text.captions.dim, text.caption_mean
        gen = torch.Generator().manual_seed(0)
        inputs = []
        for step in range(args.steps + 2):  # the bare loop's inputs, prepared up front
            x, captions, _ = data.batch(step)
            inputs.append((x, text.caption_batch(captions), text.text_batch(cfg.text.text_batch, gen)))
    inputs = [tuple(v.to(device) for v in item) for item in inputs]
    lam = dann_lambda(0.5, cfg.loss.dann_gamma)

    torch.manual_seed(0)
    engine, _ = build_engine(Stage1(cfg, caption_dim, caption_center=caption_center), cfg)
    torch.manual_seed(0)
    bare = Stage1(cfg, caption_dim, caption_center=caption_center).to(device)
    opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)

    def bare_forward(step: int) -> torch.Tensor:
        x, cap, txt = inputs[step % len(inputs)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return bare(x, cap, txt, lam, torch.Generator().manual_seed(step))["loss"]

    def bare_step(step: int) -> None:
        loss = bare_forward(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.optim.grad_clip)
        opt.step()

    last = {}

    def our_step(step: int) -> None:
        if args.synthetic:
            last.update(optimize(engine, *inputs[step % len(inputs)], lam, torch.Generator().manual_seed(step)))
        else:
            last.update(train_step(engine, cfg, text, data, step))

    def timed(fn, step: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(step)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    ours, theirs = [], []
    for step in range(args.steps + 2):
        a, b = timed(our_step, step), timed(bare_step, step)
        if step >= 2:  # skip warm-up (k-means init, first caption encodings, kernel selection)
            ours.append(a)
            theirs.append(b)
    o, b = float(np.median(ours)), float(np.median(theirs))
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: T={t} N={n} patch={m.patch} dim={m.dim} depth={m.depth} K={m.codebook_size} batch={batch}; "
          f"{args.steps} steps on {where}; {args.deepspeed.name}{', bf16' if cuda else ', fp32'}")
    print(f"ours ({'DeepSpeed engine' if args.synthetic else 'DeepSpeed engine + reader + text side'}): "
          f"{o * 1000:8.1f} ms/step (median)")
    print(f"bare PyTorch loop (same model/batch/AdamW):   {b * 1000:8.1f} ms/step (median)")
    print(f"ratio ours / bare: {o / b:.3f}   (target <= 1.15)")
    print("ours, last step: " + ", ".join(f"{k} {float(v):.4g}" for k, v in last.items()))
    tokens = batch * n * int(np.ceil(t / m.patch))
    print(f"tokens/s: ours {tokens / o:,.0f}, bare {tokens / b:,.0f}")
    if cuda:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            bare_forward(0).backward()
        flops = counter.get_total_flops()
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
            (v for k, v in PEAK_BF16.items() if k in name), None)
        print(f"model FLOPs per step (forward + backward): {flops / 1e12:.2f} TFLOP; "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        if peak is None:
            print(f"MFU: unknown peak for {name!r} (give --peak-tflops)")
        else:
            print(f"MFU (dense bf16 peak {peak / 1e12:.0f} TFLOP/s): ours {flops / o / peak:.1%}, "
                  f"bare {flops / b / peak:.1%}")


if __name__ == "__main__":
    main()
