"""Step time of stage 2's block-causal F2F step against a plain causal step of the same length and batch.

    python bench/llm_step.py                      # CPU: a SmolLM2-135M-shaped backbone, 32 ROIs x 5 steps, batch 2
    python bench/llm_step.py --size qwen3-0.6b --rois 450 --steps-per-scan 10 --batch 4 --bf16   # a GPU figure

Both steps run the same AlignModel (random weights from a config: nothing is downloaded), the same tokens and the
same loss positions (each token's logits over the K brain rows); the only difference is the attention: the 4-D
block-causal mask of F2F (a token sees its whole time step) against the causal kernel. Forward, backward and an
AdamW step, interleaved (F2F, causal, F2F, ...) so machine noise hits both alike; the ratio of medians is printed.
On CUDA it also prints model FLOPs utilisation (6 x parameters x tokens + attention, over --peak-tflops) and peak
memory. Plain PyTorch, no DeepSpeed engine: the mask is what differs, and one device shards nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llm_train.layout import additive_mask, block_causal_mask, f2f_targets
from llm_train.model import AlignModel
from llm_train.vocabulary import BrainVocab

SIZES = {  # Hugging Face configs of the backbones, random weights
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}


def backbone(size: str, codebook: int, context: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = dict(SIZES[size])
    spec["vocab_size"] += 2 + codebook  # markers + brain tokens, as stage 2 resizes it
    if size.startswith("qwen3"):
        model = Qwen3ForCausalLM(Qwen3Config(max_position_embeddings=context, **spec))
    else:
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=context, **spec))
    model.config._attn_implementation = "sdpa"
    return model.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="smollm2-135m")
    ap.add_argument("--rois", type=int, default=32)
    ap.add_argument("--steps-per-scan", type=int, default=5, help="W, time steps per scan")
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6, help="timed steps of each kind (after one warm-up each)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 peak (H100/H200: 989)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(0)
    w, n, k = args.steps_per_scan, args.rois, args.codebook
    model_vocab = SIZES[args.size]["vocab_size"]
    net = backbone(args.size, k, 1 + w * n + 8, dtype).to(device)
    vocab = BrainVocab(first_id=model_vocab + 2, size=k, scan_start=model_vocab, scan_end=model_vocab + 1)
    model = AlignModel(net, vocab, n_steps=w, n_rois=n, codebook_size=k, weights={"f2f": 1.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {"codes": torch.randint(0, k, (args.batch, w, n), device=device)}
    where, targets = f2f_targets(batch["codes"])
    mask = additive_mask(block_causal_mask(w, n), dtype, args.batch).to(device)
    positions = model.positions(args.batch, 0, device)

    def step(block: bool) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        embeds, _ = model.scan_sequence(batch, None)
        out = net(inputs_embeds=embeds, attention_mask=mask if block else None, position_ids=positions,
                  use_cache=False)
        logits = out.logits[:, where.to(device), vocab.first_id: vocab.first_id + k].float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    block_times, causal_times = [], []
    for _ in range(args.iters):
        block_times.append(step(True))
        causal_times.append(step(False))
    tb, tc = statistics.median(block_times), statistics.median(causal_times)
    tokens = args.batch * (1 + w * n)
    params = sum(p.numel() for p in net.parameters())
    cfg = net.config
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * (1 + w * n) * tokens  # 6 x 2 x L x d x T per token
    flops = 6 * params * tokens + attention
    print(f"backbone {args.size} ({params / 1e6:.0f} M params), {device}, {dtype}, batch {args.batch}, "
          f"sequence {1 + w * n} = 1 + {w} steps x {n} ROIs, K {k}")
    print(f"block-causal F2F step  {tb * 1000:9.1f} ms  ({tokens / tb:8.0f} tokens/s)")
    print(f"plain causal step      {tc * 1000:9.1f} ms  ({tokens / tc:8.0f} tokens/s)")
    print(f"ratio F2F / causal     {tb / tc:9.3f}  (target <= 1.2)")
    if device == "cuda":
        print(f"model FLOPs utilisation {flops / tb / 1e12 / args.peak_tflops * 100:.1f} % of {args.peak_tflops} "
              f"TFLOP/s; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
