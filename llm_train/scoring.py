"""How a model folder answers a task, and the figures of its answers.

Prompt (the folder's prompt format, `brain.json` `prompt_format`): `plain` (stage 2) is
`<|scan_start|> scan <|scan_end|> question "\\n" answer`, as stage 2 trained F2T and as `fmrilm ask` asks;
`chat` puts the question in the backbone's chat template with the generation prompt. k examples in context come
first, each a whole `scan question answer eos` block, then the scan asked about.

Classification: every answer option is scored by its log-likelihood given the prompt, summed over the option's
tokens and what closes an answer (eos; in `chat` the template's end of an assistant turn), so an option is a whole
answer, not the prefix of a longer one; over the whole vocabulary; the options' probabilities are the softmax of
those sums. Accuracy, balanced accuracy, AUC, F1 and calibration all come from the same probabilities.

Regression: constrained numeric decoding. The first token must be numeric (digits, a point, optionally a leading
space); after it the model continues with the best numeric token, or stops where a non-numeric token (eos, " years")
beats every numeric one; at most `max_tokens`. A text that does not parse as a number is a miss: counted, and left
out of MAE, r and R^2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmrilm_core.errors import InputError
from llm_train.layout import position_ids
from llm_train.model import AlignModel

NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


# ---- prompts ------------------------------------------------------------------------------------------------

def question_ids(tokenizer, question: str, prompt_format: str = "plain") -> list[int]:
    """The token ids between `<|scan_end|>` and the answer."""
    if prompt_format == "chat":  # rendered, then tokenized as `llm_train.instruct.ChatFormat` does in training
        text = tokenizer.apply_chat_template([{"role": "user", "content": question.strip()}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(question.strip() + "\n", add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def answer_end_ids(tokenizer, prompt_format: str = "plain") -> list[int]:
    """What closes an answer: eos in the plain format, the chat template's end of an assistant turn in `chat`."""
    if prompt_format != "chat":
        return [tokenizer.eos_token_id]
    mark = "ANSWER-END-MARK"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                                         tokenize=False)
    ids = tokenizer(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"]
    return ids or [tokenizer.eos_token_id]


@dataclass
class Shot:
    """One in-context example: its scan (codes [W, N], features [W, N, d] in the features mode) and the text that
    follows `<|scan_end|>` (question, answer, eos)."""

    scan: dict
    text: list[int]


def shot_text(tokenizer, question: str, answer: str, prompt_format: str = "plain") -> list[int]:
    return question_ids(tokenizer, question, prompt_format) + answer_ids(tokenizer, answer) + \
        answer_end_ids(tokenizer, prompt_format)


def prompt_length(model: AlignModel, shots: list[Shot], question: list[int], answer: int = 0) -> int:
    """Tokens of the sequence `shots + scan + question + answer`."""
    scan = model.scan_tokens
    return sum(scan + len(s.text) for s in shots) + scan + len(question) + answer


def context_size(model: AlignModel) -> int | None:
    config = getattr(model.backbone, "config", None)
    return getattr(config, "max_position_embeddings", None)


def check_context(model: AlignModel, shots: list[Shot], question: list[int], longest_answer: int) -> None:
    """One-line error when `k` examples + the scan + question + answer do not fit the backbone's context."""
    need, limit = prompt_length(model, shots, question, longest_answer), context_size(model)
    if limit is not None and need > limit:
        raise InputError(f"{len(shots)}-shot prompt needs {need} tokens; the model's context holds {limit} "
                         f"(each scan takes {model.scan_tokens})")


def _scan_block(model: AlignModel, scan: dict, batch: int) -> torch.Tensor:
    """`<|scan_start|> codes [fc] <|scan_end|>` embeddings [batch, model.scan_tokens, hidden] (a single scan is
    repeated)."""
    rows = {k: v if v.shape[0] == batch else v.expand(batch, *v.shape[1:]) for k, v in scan.items()}
    device = rows["codes"].device
    start = model.embed(torch.full((batch, 1), model.vocab.scan_start, device=device))
    end = torch.full((batch, 1), model.vocab.scan_end, device=device)
    tail = model.embed(torch.cat([model.connectivity_ids(rows).to(device), end], dim=1))
    return torch.cat([start, model.scan_embeddings(rows).to(start.dtype), tail], dim=1)


def sequence(model: AlignModel, shots: list[Shot], scans: dict, question: list[int],
             tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, L, hidden], position_ids [B, L]) of `shots, scan, question[, tail]` for the B scans of
    `scans` ({'codes': [B, W, N], ...}); `tail` [B, A] are token ids appended per row (an answer being scored)."""
    b = scans["codes"].shape[0]
    device = scans["codes"].device
    parts, positions, offset = [], [], 0
    scan_pos = position_ids(model.n_steps, model.n_rois, model.n_connectivity + 1, model.position_mode)

    def text(ids: torch.Tensor) -> None:
        nonlocal offset
        parts.append(model.embed(ids))
        positions.append(offset + torch.arange(ids.shape[1]))
        offset += ids.shape[1]

    def scan(block: dict) -> None:
        nonlocal offset
        parts.append(_scan_block(model, block, b))
        positions.append(offset + scan_pos)
        offset += int(scan_pos[-1]) + 1

    for shot in shots:
        scan({k: v[None].to(device) for k, v in shot.scan.items()})
        text(torch.tensor(shot.text, dtype=torch.long, device=device)[None].expand(b, -1))
    scan(scans)
    text(torch.tensor(question, dtype=torch.long, device=device)[None].expand(b, -1))
    if tail is not None:
        text(tail.to(device))
    embeds = torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)
    pos = torch.cat(positions).to(device)[None].expand(b, -1)
    return embeds, pos


# ---- classification -----------------------------------------------------------------------------------------

@torch.no_grad()
def option_loglik(model: AlignModel, scans: dict, question: list[int], options: list[list[int]],
                  shots: list[Shot] = ()) -> torch.Tensor:
    """[B, C] summed log-likelihood of each option's tokens (eos included by the caller) after the prompt."""
    shots = list(shots)
    out = []
    b = scans["codes"].shape[0]
    for option in options:
        tail = torch.tensor(option, dtype=torch.long)[None].expand(b, -1)
        embeds, pos = sequence(model, shots, scans, question, tail)
        logits = model.backbone(inputs_embeds=embeds, position_ids=pos, use_cache=False).logits.float()
        n = len(option)
        predicting = logits[:, -n - 1: -1]                      # the logits before each option token
        logp = F.log_softmax(predicting, dim=-1).gather(-1, tail.to(logits.device)[..., None])[..., 0]
        out.append(logp.sum(-1).cpu())
    return torch.stack(out, dim=1)


def option_probabilities(model: AlignModel, tokenizer, scans: dict, question: str, options: list[str],
                         shots: list[Shot] = (), prompt_format: str = "plain") -> np.ndarray:
    """[B, C] probabilities of the options (softmax of their summed log-likelihoods)."""
    q = question_ids(tokenizer, question, prompt_format)
    end = answer_end_ids(tokenizer, prompt_format)
    opts = [answer_ids(tokenizer, o) + end for o in options]
    return torch.softmax(option_loglik(model, scans, q, opts, shots).double(), dim=1).numpy()


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
def decode_numbers(model: AlignModel, tokenizer, scans: dict, question: str, shots: list[Shot] = (),
                   prompt_format: str = "plain", max_tokens: int = 4,
                   numeric: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
    """The numeric answer text of every scan (constrained greedy decoding, see the module doc); '' when the
    vocabulary holds no numeric token."""
    first, more = numeric if numeric is not None else numeric_token_ids(tokenizer)
    b = scans["codes"].shape[0]
    if len(first) == 0:
        return [""] * b
    q = question_ids(tokenizer, question, prompt_format)
    embeds, pos = sequence(model, list(shots), scans, q)
    out = model.backbone(inputs_embeds=embeds, position_ids=pos, use_cache=True)
    past, next_pos = out.past_key_values, pos[:, -1] + 1
    logits = out.logits[:, -1].float()
    texts: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    first, more = first.to(logits.device), more.to(logits.device)
    for step in range(max_tokens):
        allowed = first if step == 0 else more
        best = allowed[logits[:, allowed].argmax(-1)]
        if step > 0 and len(more):
            other = logits.clone()
            other[:, more] = float("-inf")
            stop = other.max(-1).values > logits[:, more].max(-1).values
            done |= stop.cpu()
        if step > 0 and len(more) == 0:
            break
        for i in range(b):
            if not done[i]:
                texts[i].append(int(best[i]))
        if bool(done.all()):
            break
        out = model.backbone(input_ids=best[:, None], position_ids=next_pos[:, None], past_key_values=past,
                             use_cache=True)
        past, next_pos, logits = out.past_key_values, next_pos + 1, out.logits[:, -1].float()
    return [tokenizer.decode(ids) for ids in texts]


def parse_number(text: str) -> float | None:
    match = NUMBER.fullmatch(text or "")
    return float(match.group(1)) if match else None


# ---- measures -----------------------------------------------------------------------------------------------

def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Uniform-bin reliability of the positive-class probability `p` against binary `y`: per non-empty bin the
    fraction of positives, the mean probability and the count (the bins of scikit-learn's
    `calibration_curve(strategy='uniform')`: edges linspace(0, 1, n_bins + 1), a value on an inner edge goes to the
    lower bin)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(which, minlength=n_bins)
    true = np.bincount(which, weights=y, minlength=n_bins)
    pred = np.bincount(which, weights=p, minlength=n_bins)
    keep = count > 0
    return {"prob_true": true[keep] / count[keep], "prob_pred": pred[keep] / count[keep], "count": count[keep]}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """sum over bins of (bin count / n) * |fraction of positives - mean probability| (same bins as `reliability`)."""
    r = reliability(y, p, n_bins)
    return float(np.sum(r["count"] * np.abs(r["prob_true"] - r["prob_pred"])) / max(1, r["count"].sum()))


def classification_metrics(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """accuracy, balanced accuracy, AUC, F1 (of class 1), ECE of binary probabilities [n, 2] (or [n] of class 1)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y, int)
    p1 = np.asarray(probs, float)
    p1 = p1[:, 1] if p1.ndim == 2 else p1
    pred = (p1 > 0.5).astype(int)
    out = {"n": float(len(y)), "accuracy": float(accuracy_score(y, pred)),
           "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
           "f1": float(f1_score(y, pred, zero_division=0)),
           "auc": float(roc_auc_score(y, p1)) if len(np.unique(y)) == 2 else float("nan"),
           "ece": expected_calibration_error(y, p1, n_bins)}
    return out


def regression_metrics(y: np.ndarray, pred: list[float | None]) -> dict[str, float]:
    """MAE, Pearson r, R^2 over the parsed predictions; `misses` = the unparseable ones (left out), `n` all."""
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, r2_score

    y = np.asarray(y, float)
    ok = np.array([v is not None and math.isfinite(v) for v in pred], bool)
    out = {"n": float(len(y)), "misses": float((~ok).sum()), "mae": float("nan"), "r": float("nan"),
           "r2": float("nan")}
    if ok.sum() >= 1:
        yp = np.array([v for v in pred if v is not None and math.isfinite(v)], float)
        yt = y[ok]
        out["mae"] = float(mean_absolute_error(yt, yp))
        if ok.sum() >= 2:
            out["r2"] = float(r2_score(yt, yp))
            if np.std(yp) > 0 and np.std(yt) > 0:
                out["r"] = float(pearsonr(yt, yp)[0])
    return out
