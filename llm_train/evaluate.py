"""What stage 2 measures on the val split (issue: F2F accuracy beside two baselines, caption fidelity beside two
controls, T2T perplexity before and after).

- F2F next-step code accuracy on the block-causal layout, beside *copy* (the code of the step before at the same
  ROI), *most frequent code per ROI* and a *per-ROI bigram* (both counted on train scans), on the same target
  tokens: bounds to read it against, not a bar.
- Caption fidelity: a caption is generated for each val scan and its claims are read with the corpus builder's own
  claim reader (`corpus_builder.captions.caption_claims`); fidelity = the share of the true caption's claims the
  generated one makes. Controls: *shuffled scans* (the caption generated from another val scan, scored against this
  scan's claims: what the model says without reading this scan) and *constant* (for every claim, the value most
  common in the train captions). With the scans' subjects, the paired difference from the shuffled control gets a
  95 % bootstrap interval over subjects (`fmrilm_core.bootstrap`); with `eval.claims`, the same
  figures again on those claims alone (`caption_fidelity_recoverable`, ...). Beside it, teacher-forced, the caption
  loss its own scan saves against the shuffled control's scan (`caption_loss_saved_by_scan`, paired interval over
  subjects): the early sign of a model reading the scan.
- T2T perplexity on held-out documents of the text corpus: over the text rows of the vocabulary only (at step 0 this
  is exactly the base model's, since new rows do not change the text logits) and over the whole extended vocabulary.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Collection

import numpy as np
import torch
import torch.nn.functional as F

from corpus_builder.captions import caption_claims
from fmrilm_core.bootstrap import paired_mean_difference
from llm_train.model import AlignModel


def most_frequent_codes(codes: torch.Tensor) -> torch.Tensor:
    """[S, W, N] codes of train scans -> [N], the most frequent code of each ROI."""
    flat = codes.permute(2, 0, 1).reshape(codes.shape[2], -1)
    return torch.mode(flat, dim=1).values


def bigram_table(codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-ROI bigram fitted on [S, W, N] train codes: (keys roi * K + code, sorted, of every (ROI, code) seen with
    a next step; the next code most often seen after it at that ROI, ties to the lowest code). Kept sparse: N x K^2
    counts would not fit at N = 450, K = 8192."""
    n_rois, k = codes.shape[2], codebook_size
    cur, nxt = codes[:, :-1].reshape(-1, n_rois).long(), codes[:, 1:].reshape(-1, n_rois).long()
    roi = torch.arange(n_rois).expand_as(cur)
    values, counts = np.unique(((roi * k + cur) * k + nxt).flatten().numpy(), return_counts=True)
    key, succ = values // k, values % k
    order = np.lexsort((succ, -counts, key))  # per key: the most frequent successor first
    key, succ = key[order], succ[order]
    first = np.r_[True, key[1:] != key[:-1]]
    return torch.from_numpy(key[first]), torch.from_numpy(succ[first])


def bigram_predict(codes: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor], frequent: torch.Tensor,
                   codebook_size: int) -> torch.Tensor:
    """[B, W, N] codes -> [B, (W-1) * N] the bigram's next-step code at every F2F target (an (ROI, code) never seen
    in train: that ROI's most frequent code)."""
    keys, succ = table
    n_rois = codes.shape[2]
    query = (torch.arange(n_rois) * codebook_size + codes[:, :-1].long().cpu()).reshape(codes.shape[0], -1)
    at = torch.searchsorted(keys, query).clamp_max(max(0, len(keys) - 1))
    found = keys[at] == query if len(keys) else torch.zeros_like(query, dtype=torch.bool)
    fallback = frequent.cpu()[None, None, :].expand(codes.shape[0], codes.shape[1] - 1, -1).reshape(query.shape)
    return torch.where(found, succ[at] if len(keys) else fallback, fallback)


@torch.no_grad()
def f2f_accuracy(model: AlignModel, batches: list[dict], frequent: torch.Tensor,
                 bigram: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Model, copy, most-frequent-per-ROI and (given `bigram_table`) per-ROI bigram accuracy of the next step's codes,
    over the same target tokens: bounds to read the model's figure against, not a bar it must clear (next-patch codes
    of BOLD are close to unpredictable beyond their per-ROI frequencies)."""
    hits = copy_hits = freq_hits = bigram_hits = total = 0
    for batch in batches:
        logits, targets = model.f2f_logits(batch)
        codes, targets = batch["codes"].cpu(), targets.cpu()
        hits += int((logits.argmax(-1).cpu() == targets).sum())
        copy_hits += int((codes[:, :-1].reshape(targets.shape) == targets).sum())
        freq = frequent.cpu()[None, None, :].expand(codes.shape[0], codes.shape[1] - 1, -1).reshape(targets.shape)
        freq_hits += int((freq == targets).sum())
        if bigram is not None:
            bigram_hits += int((bigram_predict(codes, bigram, frequent, model.codebook_size) == targets).sum())
        total += targets.numel()
    out = {"f2f_accuracy": hits / total, "f2f_copy_baseline": copy_hits / total,
           "f2f_frequent_baseline": freq_hits / total, "f2f_targets": float(total)}
    if bigram is not None:
        out["f2f_bigram_baseline"] = bigram_hits / total
    return out


@torch.no_grad()
def generate(model: AlignModel, batch: dict, prompt_ids: list[int], max_new_tokens: int,
             eos_id: int) -> list[list[int]]:
    """Greedy continuation of `scan + <|scan_end|> + prompt` for every scan of `batch` (KV cache; brain tokens and
    markers are never generated). Runs the same number of forward passes on every rank (ZeRO-3 gathers)."""
    was_training = model.training
    model.eval()
    device = batch["codes"].device
    b = batch["codes"].shape[0]
    suffix = torch.tensor(prompt_ids, dtype=torch.long, device=device)[None].expand(b, -1)
    embeds, n_suffix = model.scan_sequence(batch, suffix)
    positions = model.positions(b, n_suffix, device)
    out = model.backbone(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    past, next_pos = out.past_key_values, positions[:, -1] + 1
    banned = _banned_ids(model)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(b)]
    logits = out.logits[:, -1].float()
    for _ in range(max_new_tokens):
        logits[:, banned] = float("-inf")
        token = logits.argmax(-1)
        for i in range(b):
            if not finished[i]:
                generated[i].append(int(token[i]))
        finished |= token == eos_id
        if bool(finished.all()):
            break
        out = model.backbone(input_ids=token[:, None], position_ids=next_pos[:, None], past_key_values=past,
                             use_cache=True)
        past, next_pos, logits = out.past_key_values, next_pos + 1, out.logits[:, -1].float()
    model.train(was_training)
    return [ids[:-1] if ids and ids[-1] == eos_id else ids for ids in generated]


def _banned_ids(model: AlignModel) -> torch.Tensor:
    v = model.vocab
    ids = [v.scan_start, v.scan_end] + list(range(v.first_id, v.first_id + v.size))
    if model.connectivity is not None:
        c = model.connectivity
        ids += list(range(c.first_id, c.first_id + c.size))
    return torch.tensor(ids, dtype=torch.long)


def constant_claims(train_captions: list[str]) -> set[tuple[str, str]]:
    """For every claim name in the train captions, its most common value."""
    votes: dict[str, Counter] = {}
    for caption in train_captions:
        for name, value in caption_claims(caption):
            votes.setdefault(name, Counter())[value] += 1
    return {(name, counter.most_common(1)[0][0]) for name, counter in votes.items()}


def derangement(n: int, seed: int = 0) -> list[int]:
    """For each of n val scans, the other scan its shuffled-scan control uses (a seeded shift: never itself)."""
    shift = 1 + int(np.random.default_rng(seed).integers(0, max(1, n - 1)))
    return [(i + shift) % n for i in range(n)] if n > 1 else [0]


@torch.no_grad()
def caption_loss_given_scan(loss: Callable[[dict], torch.Tensor], scans: list[dict], suffixes: list[dict],
                            groups, seed: int = 0) -> dict[str, float]:
    """Teacher-forced: each val caption's loss (nats per caption token, `loss` = `AlignModel.f2t_loss` on one scan and
    its caption) given its own scan and given the shuffled control's scan (`derangement`). The paired difference,
    other minus own with a 95 % bootstrap interval over `groups` (subjects), is the caption loss the scan saves: it
    moves before greedy captions change words, so it shows a model starting to read the scan long before caption
    fidelity does (docs/results.md, the learnability bench)."""
    other = derangement(len(scans), seed)
    own = [float(loss(scans[i] | suffixes[i])) for i in range(len(scans))]
    shuffled = [float(loss(scans[other[i]] | suffixes[i])) for i in range(len(scans))]
    paired = paired_mean_difference(shuffled, own, groups, seed)
    low, high = paired["ci"] or (float("nan"), float("nan"))
    return {"caption_loss_own_scan": float(np.mean(own)), "caption_loss_shuffled_scan": float(np.mean(shuffled)),
            "caption_loss_saved_by_scan": paired["diff"], "caption_loss_saved_by_scan_ci_low": low,
            "caption_loss_saved_by_scan_ci_high": high}


def caption_shares(generated: list[str], true: list[str], constant: set[tuple[str, str]], seed: int = 0,
                   claims: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Per val scan, the share of its true caption's claims made by: its generated caption (`model`), another scan's
    generated caption (`shuffled`, a fixed derangement from `seed`), the constant caption (`constant`); NaN for a
    scan whose caption makes none of `claims` (None = all). `claims_said`: claims per generated caption."""
    truth = [caption_claims(t) for t in true]
    if claims is not None:
        names = set(claims)
        truth = [{c for c in t if c[0] in names} for t in truth]
    said = [caption_claims(g) for g in generated]
    n = len(truth)
    other = derangement(n, seed)

    def share(claims: set, target: set) -> float:
        return len(claims & target) / len(target) if target else float("nan")

    return {"model": np.array([share(s, t) for s, t in zip(said, truth)]),
            "shuffled": np.array([share(said[other[i]], truth[i]) for i in range(n)]),
            "constant": np.array([share(constant, t) for t in truth]),
            "claims_said": np.array([len(s) for s in said], float)}


def caption_fidelity(generated: list[str], true: list[str], constant: set[tuple[str, str]],
                     seed: int = 0, claims: Collection[str] | None = None, groups=None) -> dict[str, float]:
    """Share of each true caption's claims that the generated caption makes, averaged over scans; beside it the
    shuffled-scan control (another scan's generated caption) and the constant caption. `claims`: score only the
    true claims of these names (e.g. the recoverable ones of `bench/caption_recoverability.py`); None = all.
    `groups` (the subject of each scan): adds the paired difference from the shuffled control and its 95 % bootstrap
    interval over subjects (`caption_fidelity_minus_shuffled`, `_ci_low`, `_ci_high`)."""
    shares = caption_shares(generated, true, constant, seed, claims)
    with warnings.catch_warnings():  # no caption with a claim: NaN, not a warning per call
        warnings.simplefilter("ignore", RuntimeWarning)
        out = {"caption_fidelity": float(np.nanmean(shares["model"])),
               "caption_fidelity_shuffled": float(np.nanmean(shares["shuffled"])),
               "caption_fidelity_constant": float(np.nanmean(shares["constant"])),
               "caption_claims_per_caption": float(np.mean(shares["claims_said"]))}
    if groups is not None:
        paired = paired_mean_difference(shares["model"], shares["shuffled"], groups, seed)
        low, high = paired["ci"] or (float("nan"), float("nan"))
        out |= {"caption_fidelity_minus_shuffled": paired["diff"], "caption_fidelity_minus_shuffled_ci_low": low,
                "caption_fidelity_minus_shuffled_ci_high": high}
    return out


@torch.no_grad()
def t2t_perplexity(model: AlignModel, tokenizer, docs: list[str], n_text: int, max_tokens: int = 256,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Perplexity of held-out documents, over the first `n_text` vocabulary rows and over the whole vocabulary."""
    was_training = model.training
    model.eval()
    nll_text = nll_all = count = 0.0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"][:max_tokens] + [tokenizer.eos_token_id]
        if len(ids) < 2:
            continue
        ids = torch.tensor(ids, device=device)[None]
        logits = model.backbone(input_ids=ids, use_cache=False).logits[0, :-1].float()
        target = ids[0, 1:]
        nll_text += float(F.cross_entropy(logits[:, :n_text], target, reduction="sum"))
        nll_all += float(F.cross_entropy(logits, target, reduction="sum"))
        count += len(target)
    model.train(was_training)
    return {"t2t_perplexity_text_rows": float(np.exp(nll_text / count)),
            "t2t_perplexity": float(np.exp(nll_all / count))}
