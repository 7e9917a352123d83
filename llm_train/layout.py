"""Sequence layout of a scan for the LLM (docs/design.md) and the block-causal attention of F2F.

    <|scan_start|>  (w=0, n=0) (w=0, n=1) ... (w=0, n=N-1)  (w=1, n=0) ...  (w=W-1, n=N-1)  [fc x P]  <|scan_end|>  text
    position 0      1 + w * N + n                                                   1 + W * N  1 + W * N + P

Time-major, as the tokenizer emits its codes (`tokenizer_train.model.token_index`): `codes.reshape(W * N)` is the
scan block. F2F: a token sees every token of its own and earlier steps and none of later steps (block-causal); the
target of the token at (w, n) is the code at (w + 1, n), so the last step has no target. The connectivity tokens
(`connectivity.py`; none when `align.connectivity_bins` is 0) and the text after the scan are plain causal, and
F2F's sequence ends with the codes.
"""

from __future__ import annotations

import torch


def scan_positions(n_steps: int, n_rois: int, offset: int = 1) -> torch.Tensor:
    """Sequence index of every (w, n) token, [W, N] (time-major, after `offset` prefix tokens)."""
    return offset + torch.arange(n_steps * n_rois).view(n_steps, n_rois)


def block_causal_mask(n_steps: int, n_rois: int, prefix: int = 1, suffix: int = 0) -> torch.Tensor:
    """Bool [L, L] (True = may attend), L = prefix + W * N + suffix: causal, plus every token of a scan step sees
    the whole step. Prefix and suffix tokens are plain causal."""
    length = prefix + n_steps * n_rois + suffix
    step = torch.full((length,), -1, dtype=torch.long)
    step[prefix: prefix + n_steps * n_rois] = torch.arange(n_steps).repeat_interleave(n_rois)
    idx = torch.arange(length)
    causal = idx[None, :] <= idx[:, None]
    same_step = (step[:, None] == step[None, :]) & (step[:, None] >= 0)
    return causal | same_step


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    """Bool [L, L] -> the 4-D additive mask [B, 1, L, L] a Hugging Face model takes as `attention_mask`
    (0 where allowed, the dtype's minimum elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, *allowed.shape)


def f2f_targets(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [B, W, N] -> (sequence indices [(W-1) * N] of the predicting tokens, targets [B, (W-1) * N]).

    The token at (w, n), w < W - 1, predicts the code at (w + 1, n)."""
    _, n_steps, n_rois = codes.shape
    positions = scan_positions(n_steps - 1, n_rois).flatten()
    return positions, codes[:, 1:].reshape(codes.shape[0], -1)


def position_ids(n_steps: int, n_rois: int, suffix: int, mode: str) -> torch.Tensor:
    """[L] position ids: 'sequential' = 0..L-1; 'per_step' = marker 0, step w -> 1 + w (shared by its N tokens),
    then the suffix continues from W + 1."""
    length = 1 + n_steps * n_rois + suffix
    if mode == "sequential":
        return torch.arange(length)
    if mode != "per_step":
        raise ValueError(f"unknown position_ids mode {mode!r}")
    scan = 1 + torch.arange(n_steps).repeat_interleave(n_rois)
    return torch.cat([torch.zeros(1, dtype=torch.long), scan, n_steps + 1 + torch.arange(suffix)])
