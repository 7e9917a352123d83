"""Per-GPU memory of Qwen3 backbones for stage 2 under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, from DeepSpeed's
own estimators (the ones `estimate_zero{2,3}_model_states_mem_needs_all_cold` print), and the setting to use.

    python bench/memory_estimates.py [--gpus-per-node 8] [--nodes 1] [--codes 8192] [--deepspeed-tables]

Parameter counts come from the models' published Hugging Face configs (written below as numbers; nothing is
downloaded) plus the brain vocabulary stage 2 adds: K codes + 2 scan markers as new embedding rows (and LM-head
rows when the head is untied). The estimators count model states only (16-bit parameters, gradients, fp32 master
weights and AdamW moments; x1.5 buffer factor on the CPU side); activations come on top: a rough figure for the
paper-scale align step (mostly logits over the extended vocabulary) is printed beside them, and the suggested
setting is the cheapest whose states plus those activations fit in 90 % of the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Qwen3:
    """The fields of a Qwen3 config.json that fix its parameter count (no attention biases; q/k RMSNorm per head)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def params(self, new_rows: int = 0) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + 2 * self.head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = (self.vocab + new_rows) * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden

    def largest_layer(self, new_rows: int = 0) -> int:
        """The largest single module: the (extended) embedding matrix, or the untied LM head of the same size."""
        return (self.vocab + new_rows) * self.hidden


# from the published config.json of Qwen/Qwen3-{0.6B,1.7B,4B,8B}
MODELS = [
    Qwen3("Qwen3-0.6B", hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128,
          vocab=151936, tied=True),
    Qwen3("Qwen3-1.7B", hidden=2048, intermediate=6144, layers=28, heads=16, kv_heads=8, head_dim=128,
          vocab=151936, tied=True),
    Qwen3("Qwen3-4B", hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8, head_dim=128,
          vocab=151936, tied=True),
    Qwen3("Qwen3-8B", hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
          vocab=151936, tied=False),
]


def estimates(model: Qwen3, new_rows: int, gpus_per_node: int, nodes: int) -> dict[str, float]:
    """GiB per GPU (and per node's CPU for the offload) from DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = model.params(new_rows), model.largest_layer(new_rows)
    hw = {"num_gpus_per_node": gpus_per_node, "num_nodes": nodes}
    _, zero2 = estimate_zero2_model_states_mem_needs(total, cpu_offload=False, **hw)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, cpu_offload=False, cpu_offload_params=False,
                                                         zero_init=True, **hw)
    offload_cpu, offload_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, cpu_offload=True, cpu_offload_params=True, zero_init=True, **hw)
    return {"params": total, "largest": largest, "zero2": zero2 / GIB, "zero3": zero3 / GIB,
            "offload_gpu": offload_gpu / GIB, "offload_cpu": offload_cpu / GIB}


def activations_gib(model: Qwen3, new_rows: int, batch: int, tokens: int) -> float:
    """A rough figure (not DeepSpeed's) for one align step with gradient checkpointing, per GPU: the F2F and the F2T
    pass each keep their bf16 logits over the extended vocabulary for backward, the F2T loss upcasts its logits to
    fp32, and each pass keeps every layer's bf16 input for recomputation."""
    logits = batch * tokens * (model.vocab + new_rows)
    layer_inputs = model.layers * batch * tokens * model.hidden
    return (2 * logits * 2 + logits * 4 + 2 * layer_inputs * 2) / GIB


def setting(states: dict[str, float], activations: float, gpu_gib: float) -> str:
    """The cheapest setting whose model states plus activations fit in 90 % of the GPU: ZeRO-2 gathers no
    parameters (ZeRO-3 measured 1.41x slower per step on the tokenizer), ZeRO-3 all-gathers every layer each step,
    offload also moves the optimizer step to the CPU (torch's AdamW there)."""
    budget = 0.9 * gpu_gib - activations
    if states["zero2"] <= budget:
        return "ZeRO-2 (zero2.json)"
    if states["zero3"] <= budget:
        return "ZeRO-3 (zero3.json)"
    if states["offload_gpu"] <= budget:
        return "ZeRO-3 + offload (zero3_offload.json)"
    return "does not fit: fewer tokens per GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--codes", type=int, default=8192, help="brain codes K (2 scan markers are added)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (the suggested setting)")
    parser.add_argument("--batch", type=int, default=4, help="align sequences per GPU (activations)")
    parser.add_argument("--tokens", type=int, default=4800, help="tokens per align sequence (10 x 450 brain + text)")
    parser.add_argument("--deepspeed-tables", action="store_true",
                        help="also print DeepSpeed's own *_all_cold tables for every model")
    args = parser.parse_args()
    new_rows = args.codes + 2
    gpus = args.gpus_per_node * args.nodes

    print(f"Model states per GPU (GiB), {args.nodes} node(s) x {args.gpus_per_node} GPU(s), brain vocabulary "
          f"+{new_rows} rows, DeepSpeed estimators (fp32 master weights + AdamW moments, zero_init):")
    print(f"{'backbone':<11} {'params':>7} {'ZeRO-2':>7} {'ZeRO-3':>7} {'ZeRO-3+offload':>15} {'CPU/node':>9} "
          f"{'activations':>12}  setting on {args.gpu_gib:g} GiB GPUs")
    for model in MODELS:
        e = estimates(model, new_rows, args.gpus_per_node, args.nodes)
        act = activations_gib(model, new_rows, args.batch, args.tokens)
        print(f"{model.name:<11} {e['params'] / 1e9:6.2f}B {e['zero2']:7.1f} {e['zero3']:7.1f} "
              f"{e['offload_gpu']:15.1f} {e['offload_cpu']:9.0f} {act:12.1f}  {setting(e, act, args.gpu_gib)}")
    print(f"ZeRO-2 / ZeRO-3 states per GPU shrink with the {gpus} GPU(s) that share them; the offload column is the "
          "largest layer gathered on the GPU, with the rest on the CPU of each node. Activations: a rough figure (not "
          f"DeepSpeed's) for one align step of batch {args.batch} x {args.tokens} tokens per GPU with gradient "
          "checkpointing, mostly logits over the extended vocabulary.")
    if args.deepspeed_tables:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

        for model in MODELS:
            print(f"\n== {model.name} ==")
            with contextlib.redirect_stdout(io.StringIO()) as text:
                estimate_zero2_model_states_mem_needs_all_cold(model.params(new_rows), args.gpus_per_node, args.nodes)
                estimate_zero3_model_states_mem_needs_all_cold(model.params(new_rows), model.largest_layer(new_rows),
                                                               args.gpus_per_node, args.nodes)
            print(text.getvalue(), end="")


if __name__ == "__main__":
    main()
