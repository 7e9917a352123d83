"""The prompt a model folder is asked with (`llm_train.scoring` scores the answers after it), and its run through
the backbone's KV cache.

Prompt (the folder's prompt format, `brain.json` `prompt_format`): `plain` (stage 2) is
`<|scan_start|> scan <|scan_end|> question "\\n" answer`, as stage 2 trained F2T and as `fmrilm ask` asks;
`chat` puts the question in the backbone's chat template with the generation prompt. k examples in context come
first, each a whole `scan question answer eos` block, then the scan asked about.

In the layout of `sequence()` (shots, scan, question[, answer]) every scan block has the position ids of
training (`layout.position_ids`) and text consecutive ones. The cached run computes the same thing in parts:
`shot_prefix(model, shots)` runs the in-context examples once and keeps their keys and values (`ShotPrefix`); each
batch then runs its scans and the question on that cache (`_prompt`), and `llm_train.scoring` scores or decodes
the answers as continuations of it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fmrilm_core.errors import InputError
from llm_train.layout import position_ids
from llm_train.model import AlignModel

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


def _blocks(model: AlignModel, blocks: list, b: int, device, offset: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs_embeds [b, L, hidden], position_ids [b, L], the position after them) of `blocks` in order from
    position `offset`: a dict is a scan block (the scan's own position layout, `layout.position_ids`), a tensor
    [b, n] text ids (consecutive positions). The one layout of `sequence` and of the cached parts."""
    scan_pos = position_ids(model.n_steps, model.n_rois, model.n_connectivity + 1, model.position_mode)
    parts, positions = [], []
    for block in blocks:
        if isinstance(block, dict):
            parts.append(_scan_block(model, block, b))
            positions.append(offset + scan_pos)
            offset += int(scan_pos[-1]) + 1
        else:
            parts.append(model.embed(block.to(device)))
            positions.append(offset + torch.arange(block.shape[1]))
            offset += block.shape[1]
    embeds = torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)
    return embeds, torch.cat(positions).to(device)[None].expand(b, -1), offset


def _shot_blocks(shots: Sequence[Shot], b: int, device) -> list:
    out: list = []
    for shot in shots:
        out.append({k: v[None].to(device) for k, v in shot.scan.items()})
        out.append(torch.tensor(shot.text, dtype=torch.long, device=device)[None].expand(b, -1))
    return out


def _ids(ids: list[int], b: int, device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(b, -1)


def sequence(model: AlignModel, shots: list[Shot], scans: dict, question: list[int],
             tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, L, hidden], position_ids [B, L]) of `shots, scan, question[, tail]` for the B scans of
    `scans` ({'codes': [B, W, N], ...}); `tail` [B, A] are token ids appended per row (an answer being scored)."""
    b = scans["codes"].shape[0]
    device = scans["codes"].device
    blocks = [*_shot_blocks(shots, b, device), scans, _ids(question, b, device)]
    if tail is not None:
        blocks.append(tail.to(device))
    embeds, pos, _ = _blocks(model, blocks, b, device)
    return embeds, pos


# ---- the prompt run once, through the backbone's KV cache --------------------------------------------------

_CALL: dict[type, tuple[str, str | None]] = {}


def _call_names(backbone) -> tuple[str, str | None]:
    """(the forward's keyword for the KV cache, its keyword for "logits of the last positions only" or None) of a
    Hugging Face causal LM (a PEFT model: its base model): transformers 5 renamed `past_key_values` to `cache`,
    4.50 `num_logits_to_keep` to `logits_to_keep`; the project allows transformers >= 4.46."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    kind = type(base)
    if kind not in _CALL:
        params = inspect.signature(kind.forward).parameters
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        _CALL[kind] = ("cache" if "cache" in params else "past_key_values", keep)
    return _CALL[kind]


def _forward(model: AlignModel, pos: torch.Tensor, cache: Any, *, embeds: torch.Tensor | None = None,
             ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             last_only: bool = False) -> tuple[torch.Tensor, Any]:
    """(logits, the cache after this forward). `cache` None starts one. The cache is extended in place; keep
    `_kv(cache)` (tensors a later forward does not write to) to start from the same point again."""
    cache_kw, keep_kw = _call_names(model.backbone)
    kwargs: dict[str, Any] = {cache_kw: cache}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if last_only and keep_kw:  # the LM head on the last position only: a fifth of SmolLM2's FLOPs is that head
        kwargs[keep_kw] = 1
    out = model.backbone(input_ids=ids, inputs_embeds=embeds, position_ids=pos, use_cache=True, **kwargs)
    logits = out.logits[:, -1:] if last_only else out.logits
    return logits, out["cache"] if "cache" in out else out["past_key_values"]


def _kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [rows, kv heads, length, head dim] of a cache (a Cache object or a legacy tuple)."""
    return [(layer[0], layer[1]) for layer in cache]


def _cache(kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int, config) -> Any:
    """A fresh DynamicCache of `rows` rows from `kv`: one row is broadcast, r rows each repeated rows / r times
    (row i * (rows / r) + j is row i). A forward appends to it by concatenation, so `kv` is never written to."""
    from transformers import DynamicCache

    def grow(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == rows:
            return t
        if t.shape[0] == 1:
            return t.expand(rows, *t.shape[1:])
        return t.repeat_interleave(rows // t.shape[0], dim=0)

    layers = [(grow(k), grow(v)) for k, v in kv]
    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(layers, config=config)


def _model_device(model: AlignModel) -> torch.device:
    return model.backbone.get_input_embeddings().weight.device


def _same_scan(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@dataclass
class ShotPrefix:
    """The in-context examples of a task and protocol run through the backbone once (`shot_prefix`): their keys
    and values for one row, and the position id the scan asked about starts at. Built for one model; reused for
    every batch of test scans (each use expands it to the batch; nothing writes to it)."""

    shots: tuple[Shot, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # per layer, [1, heads, length, head dim]
    length: int   # tokens in the cache
    offset: int   # position id of the next token (`sequence()`'s position of the scan's <|scan_start|>)

    def holds(self, shots: Sequence[Shot]) -> bool:
        """Whether this prefix is `shots` (same scans, same texts, same order)."""
        shots = tuple(shots)
        return len(shots) == len(self.shots) and all(
            a is b or (list(a.text) == list(b.text) and _same_scan(a.scan, b.scan)) for a, b in zip(shots, self.shots))


@torch.no_grad()
def shot_prefix(model: AlignModel, shots: Sequence[Shot] = ()) -> ShotPrefix:
    """The in-context examples `shots` run once (batch 1); pass the result as `prefix=` to `option_scores`,
    `option_probabilities`, `option_loglik`, `decode_numbers` or `expected_values` for every batch of one task and
    protocol. No shots: an empty prefix (the scan starts at position 0)."""
    shots = tuple(shots)
    if not shots:
        return ShotPrefix((), [], 0, 0)
    device = _model_device(model)
    embeds, pos, offset = _blocks(model, _shot_blocks(shots, 1, device), 1, device)
    _, cache = _forward(model, pos, None, embeds=embeds, last_only=True)
    return ShotPrefix(shots, _kv(cache), embeds.shape[1], offset)


def _resolve_prefix(model: AlignModel, shots: Sequence[Shot], prefix: ShotPrefix | None) -> ShotPrefix:
    if prefix is None:
        return shot_prefix(model, shots)
    if shots and not prefix.holds(shots):  # a prefix of other examples would score a different prompt silently
        raise InputError(f"prefix holds {len(prefix.shots)} in-context examples that are not the {len(tuple(shots))} "
                         "shots given: build it with shot_prefix(model, shots)")
    return prefix


def _prompt(model: AlignModel, scans: dict, question: list[int], prefix: ShotPrefix
            ) -> tuple[Any, torch.Tensor, int]:
    """Each scan and the question run on the shots' cache: (the cache of the whole prompt [B rows], the logits
    after the prompt [B, V] float32, the position of the next token)."""
    b = scans["codes"].shape[0]
    device = scans["codes"].device
    embeds, pos, offset = _blocks(model, [scans, _ids(question, b, device)], b, device, prefix.offset)
    cache = _cache(prefix.kv, b, model.backbone.config) if prefix.kv else None
    logits, cache = _forward(model, pos, cache, embeds=embeds, last_only=True)
    return cache, logits[:, -1].float(), offset
