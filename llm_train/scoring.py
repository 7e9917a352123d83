"""How a model folder answers a task, and the figures of its answers.

The prompt (its formats, the in-context examples, its layout and its run through the KV cache) is
`llm_train.prompt`'s; its public names are importable from here as well.

Classification: every answer option is scored by its log-likelihood given the prompt, summed over the option's
tokens and what closes an answer (eos; in `chat` the template's end of an assistant turn), so an option is a whole
answer, not the prefix of a longer one; over the whole vocabulary. `option_scores` returns those sums and their
mean per token, in float64; a two-option classifier's score is the log-odds `log_odds(scores)`, which keeps the
ranking of scans that a float64 softmax would round to exactly 0 or 1 (ties in the AUC). The options'
probabilities (`option_probabilities`, `fmrilm ask`) are the softmax of the sums. The figures of those scores are
`evaluation.metrics`'.

Regression: constrained numeric decoding. The first token must be numeric (digits, a point, optionally a leading
space); after it the model continues with the best numeric token, or stops where a non-numeric token (eos, " years")
beats every numeric one; at most `max_tokens`. A text that does not parse as a number is a miss: `fmrilm eval`
counts it and scores the train split's mean in its place, so MAE, r and R^2 cover the baselines' scans.
`expected_values` instead scores every value of a grid as an answer option and returns the probability-weighted
mean: a prediction for every scan (no misses) that moves smoothly with the model's belief.

Speed (KV cache): the prompt is run in three parts, each once. The in-context examples are the same for every test
scan of a task and protocol, so `shot_prefix(model, shots)` runs them once (one row) and keeps their keys and
values; each batch then runs only its scans and the question on that cache (expanded to the batch), and every
option is a continuation of the batch's cache: the C options packed into one row per scan, with a block-diagonal
mask so an option sees the prompt and its own earlier tokens only (one short forward, the cache copied once).
Position ids are those of `sequence()`, so the figures equal the uncached computation (`option_loglik_reference`,
kept for the tests and `bench/eval_speed.py`) to float rounding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmrilm_core.errors import InputError
from llm_train.layout import additive_mask
from llm_train.model import AlignModel
from llm_train.prompt import (  # noqa: F401  (the prompt's names: importable from here as before)
    Shot,
    ShotPrefix,
    _cache,
    _forward,
    _ids,
    _kv,
    _prompt,
    _resolve_prefix,
    answer_end_ids,
    answer_ids,
    check_context,
    context_size,
    prompt_length,
    question_ids,
    sequence,
    shot_prefix,
    shot_text,
)

NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


# ---- answers as continuations of the cached prompt ----------------------------------------------------------

def _gather(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def _continuations(model: AlignModel, cache: Any, last: torch.Tensor, offset: int, options: list[list[int]],
                   how: str = "packed") -> torch.Tensor:
    """[B, C] float64 summed log-likelihood of each option as the continuation of a prompt (its cache, the logits
    after it `last` [B, V], the next position `offset`). The first token of an option is read off `last`; the rest
    need one forward over the option's tokens but the last.

    `how`: 'packed' (default; fastest, bench/eval_speed.py) puts the C options one after another in a single row
    per scan, each token seeing the prompt and its own option's earlier tokens (a 4-D mask); 'rows' runs B x C rows
    (the cache repeated per option, options right-padded: padding comes after every scored token, so causal
    attention keeps it unseen); 'per_option' runs one forward of B rows per option, each on a copy of the cache."""
    b, device = last.shape[0], last.device
    first = torch.tensor([o[0] for o in options], dtype=torch.long, device=device)
    total = F.log_softmax(last, dim=-1)[:, first].double()
    if all(len(o) == 1 for o in options):
        return total
    if how == "packed" and getattr(model.backbone.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        how = "per_option"  # flash-attention kernels take no 4-D mask: packed options would see one another
    if how == "packed":
        which = torch.tensor([c for c, o in enumerate(options) for _ in o[1:]], device=device)
        step = torch.tensor([j for o in options for j in range(len(o) - 1)], device=device)
        inputs = _ids([t for o in options for t in o[:-1]], b, device)
        targets = _ids([t for o in options for t in o[1:]], b, device)
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2]
        allowed = torch.ones(len(step), past + len(step), dtype=torch.bool, device=device)
        allowed[:, past:] = (which[:, None] == which[None, :]) & (step[None, :] <= step[:, None])
        mask = additive_mask(allowed, model.backbone.get_input_embeddings().weight.dtype, b)
        logits, _ = _forward(model, (offset + step)[None].expand(b, -1), cache, ids=inputs, mask=mask)
        logp = _gather(logits, targets).double()
        return total.index_add(1, which, logp)
    kv = _kv(cache)
    if how == "rows":
        c, width = len(options), max(len(o) for o in options) - 1
        pad = [o[:-1] + [o[-1]] * (width - len(o) + 1) for o in options]   # any id: never seen, never scored
        tgt = [o[1:] + [o[-1]] * (width - len(o) + 1) for o in options]
        valid = torch.tensor([[j < len(o) - 1 for j in range(width)] for o in options], device=device)
        inputs = torch.tensor(pad, dtype=torch.long, device=device).repeat(b, 1)      # row i * C + c: option c
        pos = (offset + torch.arange(width, device=device))[None].expand(b * c, -1)
        logits, _ = _forward(model, pos, _cache(kv, b * c, model.backbone.config), ids=inputs)
        logp = _gather(logits, torch.tensor(tgt, dtype=torch.long, device=device).repeat(b, 1)).double()
        return total + (logp * valid.repeat(b, 1)).sum(-1).view(b, c)
    if how != "per_option":
        raise ValueError(f"unknown continuation {how!r}")
    out = total.clone()
    for c, option in enumerate(options):
        if len(option) > 1:
            pos = (offset + torch.arange(len(option) - 1, device=device))[None].expand(b, -1)
            logits, _ = _forward(model, pos, _cache(kv, b, model.backbone.config), ids=_ids(option[:-1], b, device))
            out[:, c] += _gather(logits, _ids(option[1:], b, device)).double().sum(-1)
    return out


# ---- classification -----------------------------------------------------------------------------------------

@torch.no_grad()
def option_loglik(model: AlignModel, scans: dict, question: list[int], options: list[list[int]],
                  shots: Sequence[Shot] = (), prefix: ShotPrefix | None = None, how: str = "packed") -> torch.Tensor:
    """[B, C] float64 summed log-likelihood of each option's tokens (eos included by the caller) after the prompt;
    the shots from `prefix` (`shot_prefix(model, shots)`, built once per task and protocol) when given."""
    if not options or any(len(o) == 0 for o in options):
        raise InputError("every answer option needs at least one token")
    prefix = _resolve_prefix(model, shots, prefix)
    cache, last, offset = _prompt(model, scans, question, prefix)
    return _continuations(model, cache, last, offset, options, how).cpu()


@torch.no_grad()
def option_loglik_reference(model: AlignModel, scans: dict, question: list[int], options: list[list[int]],
                            shots: Sequence[Shot] = ()) -> torch.Tensor:
    """`option_loglik` without a cache: the whole sequence (shots, scan, question, option) once per option, as it
    was computed before the cache. Kept as the reference of the tests and of bench/eval_speed.py."""
    shots = list(shots)
    out = []
    b = scans["codes"].shape[0]
    for option in options:
        tail = torch.tensor(option, dtype=torch.long)[None].expand(b, -1)
        embeds, pos = sequence(model, shots, scans, question, tail)
        # an explicit all-ones mask: without one, transformers 5 reads position ids that do not grow by 1 (the
        # per_step layout) as packed sequences and cuts attention at every repeat
        mask = torch.ones(pos.shape, dtype=torch.long, device=pos.device)
        logits = model.backbone(inputs_embeds=embeds, position_ids=pos, attention_mask=mask,
                                use_cache=False).logits.float()
        n = len(option)
        predicting = logits[:, -n - 1: -1]                      # the logits before each option token
        logp = F.log_softmax(predicting, dim=-1).gather(-1, tail.to(logits.device)[..., None])[..., 0]
        out.append(logp.double().sum(-1).cpu())
    return torch.stack(out, dim=1)


def option_ids(tokenizer, options: Sequence[str], prompt_format: str = "plain") -> list[list[int]]:
    """Each option as a whole answer: its tokens, then what closes an answer."""
    end = answer_end_ids(tokenizer, prompt_format)
    return [answer_ids(tokenizer, o) + end for o in options]


def option_scores(model: AlignModel, tokenizer, scans: dict, question: str, options: Sequence[str],
                  shots: Sequence[Shot] = (), prompt_format: str = "plain",
                  prefix: ShotPrefix | None = None) -> dict[str, np.ndarray]:
    """Per scan and option, float64: `sum` [B, C] the summed log-likelihood of the whole answer (its tokens and
    the answer end), `mean` [B, C] that sum over the option's token count (`tokens` [C]), a score that does not
    favour short options."""
    q = question_ids(tokenizer, question, prompt_format)
    opts = option_ids(tokenizer, options, prompt_format)
    total = option_loglik(model, scans, q, opts, shots, prefix).numpy()
    tokens = np.array([len(o) for o in opts], dtype=np.int64)
    return {"sum": total, "mean": total / tokens, "tokens": tokens}


def log_odds(scores: dict[str, np.ndarray], key: str = "sum") -> np.ndarray:
    """[B] log-likelihood of option 1 minus option 0 (class 1 is the positive one): a two-option classifier's
    score. Unlike the softmax probability it never rounds to exactly 0 or 1, so it ranks every scan (AUC)."""
    values = np.asarray(scores[key], dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise InputError(f"log-odds need exactly two options, got scores of shape {values.shape}")
    return values[:, 1] - values[:, 0]


def option_probabilities(model: AlignModel, tokenizer, scans: dict, question: str, options: list[str],
                         shots: Sequence[Shot] = (), prompt_format: str = "plain",
                         prefix: ShotPrefix | None = None) -> np.ndarray:
    """[B, C] probabilities of the options (softmax of their summed log-likelihoods)."""
    total = option_scores(model, tokenizer, scans, question, options, shots, prompt_format, prefix)["sum"]
    return torch.softmax(torch.from_numpy(total), dim=1).numpy()


# ---- regression ---------------------------------------------------------------------------------------------

_NUMERIC: dict[int, tuple] = {}  # id(tokenizer) -> (first, more, the tokenizer itself: ids can be reused)


def numeric_token_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids of tokens that may start a number: digits / point with an optional leading space, ids that may continue
    one: digits / point only); computed once per tokenizer object (a pass over the vocabulary)."""
    if id(tokenizer) in _NUMERIC and _NUMERIC[id(tokenizer)][2] is tokenizer:
        return _NUMERIC[id(tokenizer)][:2]
    first, more = [], []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text and re.fullmatch(r"[0-9.]+", text):
            first.append(i)
            more.append(i)
        elif text and re.fullmatch(r" [0-9.]+", text):
            first.append(i)
    found = torch.tensor(first, dtype=torch.long), torch.tensor(more, dtype=torch.long)
    _NUMERIC[id(tokenizer)] = (*found, tokenizer)
    return found


@torch.no_grad()
def decode_numbers(model: AlignModel, tokenizer, scans: dict, question: str, shots: Sequence[Shot] = (),
                   prompt_format: str = "plain", max_tokens: int = 4,
                   numeric: tuple[torch.Tensor, torch.Tensor] | None = None,
                   prefix: ShotPrefix | None = None) -> list[str]:
    """The numeric answer text of every scan (constrained greedy decoding, see the module doc), from the shots'
    cache `prefix` when given; '' when the vocabulary holds no numeric token, and a number's first token alone
    when no token may continue one."""
    first, more = numeric if numeric is not None else numeric_token_ids(tokenizer)
    b = scans["codes"].shape[0]
    if len(first) == 0:
        return [""] * b
    prefix = _resolve_prefix(model, shots, prefix)
    cache, logits, next_pos = _prompt(model, scans, question_ids(tokenizer, question, prompt_format), prefix)
    texts: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    first, more = first.to(logits.device), more.to(logits.device)
    for step in range(max_tokens):
        if step > 0:
            if len(more) == 0:  # nothing numeric may follow: every number is its first token
                break
            other = logits.clone()
            other[:, more] = float("-inf")
            done |= (other.max(-1).values > logits[:, more].max(-1).values).cpu()
            if bool(done.all()):
                break
        allowed = first if step == 0 else more
        best = allowed[logits[:, allowed].argmax(-1)]
        for i in range(b):
            if not done[i]:
                texts[i].append(int(best[i]))
        if step == max_tokens - 1:  # the last token: no forward for a next one
            break
        pos = torch.full((b, 1), next_pos + step, dtype=torch.long, device=logits.device)
        out, cache = _forward(model, pos, cache, ids=best[:, None])
        logits = out[:, -1].float()
    return [tokenizer.decode(ids) for ids in texts]


def parse_number(text: str) -> float | None:
    match = NUMBER.fullmatch(text or "")
    return float(match.group(1)) if match else None


def expected_values(model: AlignModel, tokenizer, scans: dict, question: str, grid: Sequence[float],
                    shots: Sequence[Shot] = (), prompt_format: str = "plain", prefix: ShotPrefix | None = None,
                    render: Callable[[float], str] = lambda v: f"{v:g}") -> np.ndarray:
    """[B] expected value of the answer over `grid`: each value rendered as the corpus answers it (`render`; for age
    e.g. `lambda v: canonical_answers({'age': v})['age']`) and scored as a whole answer option (as
    `option_probabilities`), the softmax of the summed log-likelihoods over the grid weighting the values."""
    values = np.asarray(list(grid), dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise InputError("expected values need a non-empty grid of finite numbers")
    texts = [render(float(v)) for v in values]
    total = option_scores(model, tokenizer, scans, question, texts, shots, prompt_format, prefix)["sum"]
    p = np.exp(total - total.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ values
