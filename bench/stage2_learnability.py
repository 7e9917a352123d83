"""Learnability of the stage-2 machinery: does a small LLM trained from scratch on F2T learn to read the scan?

    .venv/bin/python bench/stage2_learnability.py [--corpus runs/llm-quality/corpus]
        [--tokenizer runs/llm-quality/tokenizer/tokenizer] [--recoverable runs/llm-quality/recoverable.json]
        [--minutes 8] [--steps 2000] [--hidden 128] [--layers 4] [--batch 8] [--lr 3e-3]

Why: SmolLM2 after a few hundred CPU steps writes a typical caption whatever the scan (caption fidelity at the
shuffled-scan control). That can be compute, claims the tokens do not carry, or the wiring. Captions are templated,
so a small randomly initialised Llama learns their language in minutes; if it still does not beat the shuffled-scan
control on the claims the tokens carry (`bench/caption_recoverability.py`), the wiring is wrong.

Same machinery as `llm_train.train`: the SmolLM2 tokenizer with the markers, the K brain tokens and the connectivity
tokens added (`add_brain_tokens`, `ConnectivityTokens.add_to`), their rows initialised as stage 2 does
(`init_brain_rows` from the stage-1 codebook, `init_rows` from the level phrases), `AlignModel` (the scan layout,
positions, F2T labels and loss), `AlignBatches` (train batches: the frozen stage-1 tokenizer encodes every step's
scans), the LR schedule of `fmrilm_core.engine.lr_lambda`, and validation's `generate` and `caption_fidelity`. What
differs: the backbone is a `--layers` x `--hidden` Llama with random weights (the stage-1 codebook's rows, K x 576,
span only code_dim directions, so they are placed in the small model's width along their principal axes, geometry
kept), all of it trained with AdamW (no DeepSpeed, no LoRA), on F2T alone.

Prints, on the val split, caption fidelity (share of the true caption's claims the generated caption makes) on all
claims and on the recoverable ones, beside the shuffled-scan control (another val scan's generated caption) and the
constant caption (the train split's most common value of each claim), every `--eval-every` steps; the steps, CPU
minutes and tokens/s (CPU time over both threads).

Speed on the shared 2-core CPU: the first version, with every SmolLM2 row in the model, ran 7 steps of 8 scans a
CPU minute, 95 % of it the LM head and its softmax over 49.8k rows at every position; F2T now computes logits only
at the caption positions (`AlignModel.f2t_loss`, same loss) and the model holds the compact vocabulary (803 rows):
2 layers x 64 then take about 2.4 CPU s a step of 8 scans (about 1400 tokens per CPU s), the cost of the layers
over 470-token sequences.

What the toy check (`tests/test_stage2_wiring.py`) adds: the wiring carries both kinds of scan token to the
caption, but a tiny model learns a connectivity token's level (its id names its network pair) in 50 steps and a
brain code at the start of the block in 200, while a code *inside* the block, found by its position alone among
alike brain tokens, stayed at chance for 300 steps. Claims about one network's codes ask exactly that of stage 2;
tokens that carry their ROI (per-ROI code rows, or an ROI marker) would make it content-addressable.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from corpus_builder.readers import read_captions
from fmrilm_core.engine import lr_lambda
from fmrilm_core.llm import load_tokenizer
from llm_train.connectivity import fit_on_corpus
from llm_train.data import AlignBatches, CaptionSuffix
from llm_train.evaluate import caption_fidelity, caption_loss_given_scan, constant_claims, generate
from llm_train.model import IGNORE, AlignModel
from llm_train.train import load_brain_tokenizer
from llm_train.vocabulary import add_brain_tokens, init_brain_rows


def small_llama(vocab_size: int, hidden: int, layers: int, context: int, seed: int):
    """A randomly initialised Llama of `layers` x `hidden` (heads of 32), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                         max_position_embeddings=context, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def codebook_in(width: int, codebook: torch.Tensor) -> torch.Tensor:
    """The codebook [K, d] expressed in `width` dimensions along its principal axes (its centred rows span at most
    code_dim directions, so nothing is lost when width >= that), mean and distances kept."""
    mean = codebook.mean(0)
    _, sv, vh = torch.linalg.svd(codebook - mean, full_matrices=False)
    rank = int((sv > sv[0] * 1e-5).sum())
    if rank > width:
        raise SystemExit(f"the codebook spans {rank} directions, more than the model's width {width}")
    coords = (codebook - mean) @ vh[:rank].T
    return torch.nn.functional.pad(coords, (0, width - rank))


class CompactVocabulary:
    """The text ids the run can meet (every train and val caption, the prompt, eos, the connectivity phrases),
    renumbered 0..V-1, then the added rows (markers, brain, connectivity) in their order. A model trained from
    scratch never sees the other 49k SmolLM2 rows, and their LM-head logits were 95 % of a step of the small model
    (it ran 7 steps a CPU minute): the compact model computes the same loss over the classes that occur."""

    def __init__(self, used_text: set[int], n_text: int, n_total: int):
        self.full = torch.tensor(sorted(used_text) + list(range(n_text, n_total)))
        self.n_text = len(used_text)
        self.compact = torch.full((n_total,), -1, dtype=torch.long)
        self.compact[self.full] = torch.arange(len(self.full))

    def __len__(self) -> int:
        return len(self.full)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Full ids -> compact ids (IGNORE labels stay IGNORE)."""
        ids = torch.as_tensor(ids)
        return torch.where(ids == IGNORE, ids, self.compact[ids.clamp_min(0)])

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self(v) if k in ("suffix_ids", "suffix_labels", "connectivity") else v for k, v in batch.items()}


class CompactTokenizer:
    """What `ConnectivityTokens.init_rows` asks of a tokenizer (a phrase's ids), in compact ids."""

    def __init__(self, tokenizer, compact: CompactVocabulary):
        self.tokenizer, self.compact = tokenizer, compact

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": self.compact(torch.tensor(ids)).tolist()}


def build(args, brain_tokenizer, connectivity, captions: list[str]):
    """(AlignModel, LLM tokenizer, CompactVocabulary or None) with the stage-2 vocabulary, layout and losses on a
    small random Llama."""
    tokenizer = load_tokenizer(None)
    n_text = len(tokenizer)
    tc = brain_tokenizer.config
    vocab = add_brain_tokens(tokenizer, tc.codebook_size)
    connectivity = connectivity.add_to(tokenizer)
    compact = None
    if not args.full_vocabulary:
        used = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        for text in [*captions, args.prompt + "\n", *connectivity.phrases()]:
            used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
        compact = CompactVocabulary(used, n_text, len(tokenizer))
        vocab = replace(vocab, first_id=int(compact.compact[vocab.first_id]),
                        scan_start=int(compact.compact[vocab.scan_start]),
                        scan_end=int(compact.compact[vocab.scan_end]))
        connectivity = replace(connectivity, first_id=int(compact.compact[connectivity.first_id]))
        n_text = compact.n_text
    backbone = small_llama(len(compact) if compact else len(tokenizer), args.hidden, args.layers, 1024, args.seed)
    with torch.no_grad():
        init_brain_rows(backbone, vocab, n_text, codebook_in(args.hidden, brain_tokenizer.codebook.float()))
        connectivity.init_rows(backbone, CompactTokenizer(tokenizer, compact) if compact else tokenizer)
    model = AlignModel(backbone, vocab, n_steps=brain_tokenizer.n_steps, n_rois=tc.n_rois,
                       codebook_size=tc.codebook_size, weights={"f2f": 0.0, "f2t": 1.0, "t2t": 0.0},
                       connectivity=connectivity)
    return model, tokenizer, compact


@torch.no_grad()
def caption_nll(model, compact: CompactVocabulary | None, val: AlignBatches, keys: list[str], suffix) -> dict:
    """Teacher-forced caption loss given the scan's own tokens and given the shuffled control's scan
    (`llm_train.evaluate.caption_loss_given_scan`, as stage 2's validation reports it), paired over scans."""
    def loss(batch: dict) -> torch.Tensor:
        return model.f2t_loss(compact.batch(batch) if compact is not None else batch)

    return caption_loss_given_scan(loss, [val.scans_of([k]) for k in keys],
                                   [suffix([val.scans.caption_of[k]]) for k in keys], keys)


@torch.no_grad()
def fidelity(model, tokenizer, compact: CompactVocabulary | None, val: AlignBatches, keys: list[str], constant,
             recoverable: list[str], prompt_ids: list[int], max_new_tokens: int) -> dict[str, float]:
    generated = []
    eos = tokenizer.eos_token_id
    if compact is not None:
        prompt_ids, eos = compact(torch.tensor(prompt_ids)).tolist(), int(compact.compact[eos])
    for i in range(0, len(keys), 8):
        batch = val.scans_of(keys[i:i + 8])
        batch = compact.batch(batch) if compact is not None else batch
        for ids in generate(model, batch, prompt_ids, max_new_tokens, eos):
            ids = compact.full[torch.tensor(ids, dtype=torch.long)].tolist() if compact is not None else ids
            generated.append(tokenizer.decode(ids, skip_special_tokens=True))
    true = [val.scans.caption_of[k] for k in keys]
    out = caption_fidelity(generated, true, constant)
    if recoverable:
        out |= {f"{k}_recoverable": v for k, v in
                caption_fidelity(generated, true, constant, claims=recoverable).items()}
    out["example"] = generated[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("runs/llm-quality/corpus"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/llm-quality/tokenizer/tokenizer"))
    parser.add_argument("--recoverable", type=Path, default=Path("runs/llm-quality/recoverable.json"),
                        help="bench/caption_recoverability.py's JSON (its `recoverable` list); absent: all claims")
    parser.add_argument("--bins", type=int, default=4, help="connectivity levels (align.connectivity_bins)")
    parser.add_argument("--minutes", type=float, default=8.0, help="stop training after this much CPU time")
    parser.add_argument("--steps", type=int, default=2000, help="the LR schedule's length (and the most steps)")
    parser.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--max-caption-tokens", type=int, default=280)
    parser.add_argument("--val-scans", type=int, default=40)
    parser.add_argument("--prompt", default="Describe this scan.")
    parser.add_argument("--full-vocabulary", action="store_true",
                        help="every SmolLM2 row in the model (about 15x slower a step); default: the compact one")
    parser.add_argument("--blank-codes", action="store_true",
                        help="every brain code replaced by code 0 (train and val): only the connectivity tokens carry "
                             "the scan, so the model cannot tell train scans apart by their codes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cpu0 = time.process_time()

    def blank(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch | {"codes": torch.zeros_like(batch["codes"])} if args.blank_codes else batch

    brain_tokenizer = load_brain_tokenizer(args.tokenizer)
    connectivity = fit_on_corpus(args.corpus, args.bins)
    captions = read_captions(args.corpus, "train") | read_captions(args.corpus, "val")
    model, tokenizer, compact = build(args, brain_tokenizer, connectivity, list(captions.values()))
    recoverable = json.loads(args.recoverable.read_text())["recoverable"] if args.recoverable.is_file() else []
    suffix = CaptionSuffix(tokenizer, args.prompt, args.max_caption_tokens)
    # the batches are made with the full vocabulary's ids (connectivity ids included), then made compact
    full_connectivity = replace(model.connectivity, first_id=int(compact.full[model.connectivity.first_id])) \
        if compact is not None else model.connectivity
    train = AlignBatches(args.corpus, "train", brain_tokenizer, suffix, None, batch_size=args.batch, features=False,
                         seed=args.seed, connectivity=full_connectivity)
    val = AlignBatches(args.corpus, "val", brain_tokenizer, suffix, None, batch_size=args.batch, features=False,
                       seed=args.seed, connectivity=full_connectivity)
    keys = val.scans.keys[: args.val_scans]
    if args.blank_codes:
        scans_of = val.scans_of
        val.scans_of = lambda k: blank(scans_of(k))
    constant = constant_claims([train.scans.caption_of[k] for k in train.scans.keys])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers x {args.hidden}, {n_params / 1e6:.1f} M parameters, vocabulary "
          f"{len(tokenizer)}" + (f" (compact: {len(compact)} rows)" if compact is not None else "")
          + f"; {len(train.scans.keys)} train scans, {len(keys)} val scans; recoverable claims: "
          f"{', '.join(recoverable) or 'none given'}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        warmup_steps=args.warmup, total_steps=args.steps, schedule="cosine", min_lr_ratio=0.1))
    max_new = args.max_caption_tokens + 1
    eval_cpu = 0.0
    tokens = 0
    train_cpu0 = time.process_time()
    step = 0
    loss = torch.tensor(float("nan"))

    def report(step: int) -> None:
        nonlocal eval_cpu
        t = time.process_time()
        model.eval()
        m = fidelity(model, tokenizer, compact, val, keys, constant, recoverable, suffix.prompt_ids, max_new)
        m |= caption_nll(model, compact, val, keys, suffix)
        model.train()
        eval_cpu += time.process_time() - t
        line = (f"step {step:5d}  loss {float(loss):.3f}  fidelity all {m['caption_fidelity']:.3f} (shuffled "
                f"{m['caption_fidelity_shuffled']:.3f}, constant {m['caption_fidelity_constant']:.3f})")
        if recoverable:
            line += (f"  recoverable {m['caption_fidelity_recoverable']:.3f} (shuffled "
                     f"{m['caption_fidelity_shuffled_recoverable']:.3f}, constant "
                     f"{m['caption_fidelity_constant_recoverable']:.3f})")
        ci = m["caption_loss_saved_by_scan_ci_low"], m["caption_loss_saved_by_scan_ci_high"]
        line += (f"\n        caption loss given its own scan {m['caption_loss_own_scan']:.4f}, given another scan "
                 f"{m['caption_loss_shuffled_scan']:.4f}: the scan saves {m['caption_loss_saved_by_scan']:+.4f} "
                 f"[{ci[0]:+.4f}, {ci[1]:+.4f}] nats per caption token")
        print(line, flush=True)
        return m

    model.train()
    while step < args.steps and time.process_time() - train_cpu0 - eval_cpu < args.minutes * 60:
        batch = blank(train.batch(step))
        batch = compact.batch(batch) if compact is not None else batch
        losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = losses["loss"].detach()
        tokens += batch["codes"][:, :, :].numel() + batch["suffix_mask"].sum().item() + batch["codes"].shape[0] * (
            2 + model.n_connectivity)
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  loss {float(loss):.3f}", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            report(step)
    train_cpu = time.process_time() - train_cpu0 - eval_cpu
    final = report(step)
    print(f"\n{step} steps x {args.batch} scans, {train_cpu / 60:.1f} CPU min of training ({tokens / train_cpu:.0f} "
          f"tokens per CPU s), {(time.process_time() - cpu0) / 60:.1f} CPU min in all")
    print(f"example (val scan {keys[0]}): {final['example'][:400]}")


if __name__ == "__main__":
    main()
