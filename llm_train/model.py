"""`AlignModel`: the backbone LLM and, in the `features` mode, the brain side; `forward(batch)` returns the losses.

Two ways for a scan to enter the LLM (config `input_mode`):
- `tokens` (default): each code is a token `<|brain_k|>` of the extended vocabulary (`vocabulary.py`); F2F predicts
  the next step's codes through the LM head's brain rows. The checkpoint is a stock Hugging Face model.
- `features` (the reference implementation's design): the tokenizer's continuous features (its encoder output
  projected into the LLM's space, `to_llm(z)`) go through a trained projection plus an ROI embedding, and a separate
  head predicts codes. The backbone still saves in HF format; the brain side in safetensors beside it.

Connectivity tokens (`connectivity.py`), when the model has them, follow the codes in every sequence that has text
after the scan: `<|scan_start|> codes fc <|scan_end|> text`; F2F's block is the codes alone.

Attention: F2F runs on the block-causal layout (`layout.block_causal_mask`, a 4-D additive mask in SDPA). F2T and
text are plain causal, so a stock `generate` describes a scan with no custom mask; the caption tokens see the
whole scan either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_train.connectivity import ConnectivityTokens
from llm_train.layout import additive_mask, block_causal_mask, f2f_targets, position_ids
from llm_train.vocabulary import BrainVocab

IGNORE = -100


class BrainFeatureAdapter(nn.Module):
    """The features mode's brain side: projection of the tokenizer's features + ROI embedding in, code head out."""

    def __init__(self, feature_dim: int, hidden: int, n_rois: int, codebook_size: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, hidden)
        self.roi = nn.Parameter(torch.randn(n_rois, hidden) * 0.02)
        self.code_head = nn.Linear(hidden, codebook_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, W, N, d] -> [B, W * N, hidden], time-major."""
        x = self.proj(features.to(self.proj.weight.dtype)) + self.roi
        return x.flatten(1, 2)


class AlignModel(nn.Module):
    def __init__(self, backbone: nn.Module, vocab: BrainVocab, *, n_steps: int, n_rois: int, codebook_size: int,
                 input_mode: str = "tokens", position_mode: str = "sequential", adapter: BrainFeatureAdapter | None
                 = None, weights: dict[str, float] | None = None, connectivity: ConnectivityTokens | None = None):
        super().__init__()
        self.connectivity = connectivity
        self.backbone = backbone
        self.vocab, self.n_steps, self.n_rois, self.codebook_size = vocab, n_steps, n_rois, codebook_size
        self.input_mode, self.position_mode = input_mode, position_mode
        self.adapter = adapter
        self.weights = weights or {"f2f": 1.0, "f2t": 1.0, "t2t": 0.0}
        if (input_mode == "features") != (adapter is not None):
            raise ValueError("the features mode needs a BrainFeatureAdapter, the tokens mode none")

    # ---- inputs

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def scan_embeddings(self, batch: dict) -> torch.Tensor:
        """[B, W * N, hidden] for the scan block: brain-token embeddings, or the adapter's projected features."""
        if self.input_mode == "tokens":
            return self.embed(self.vocab.ids(batch["codes"]).flatten(1))
        return self.adapter(batch["features"])

    @property
    def n_connectivity(self) -> int:
        """P: connectivity tokens per scan (0 without them)."""
        return self.connectivity.n_tokens if self.connectivity is not None else 0

    @property
    def scan_tokens(self) -> int:
        """Tokens of one `<|scan_start|> codes [fc] <|scan_end|>` block."""
        return self.n_steps * self.n_rois + 2 + self.n_connectivity

    def connectivity_ids(self, batch: dict) -> torch.Tensor:
        """[B, P] connectivity token ids of the batch ([B, 0] for a model without them)."""
        if self.connectivity is None:
            return batch["codes"].new_zeros((batch["codes"].shape[0], 0))
        if "connectivity" not in batch:
            raise ValueError("this model reads connectivity tokens: encode its scans with encode_scans(..., "
                             "model.connectivity)")
        return batch["connectivity"]

    def scan_sequence(self, batch: dict, suffix_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """inputs_embeds of `<|scan_start|> codes [fc <|scan_end|> suffix]`, and the length after the codes (0 without
        a suffix; else the connectivity tokens, the end marker and the suffix)."""
        b = batch["codes"].shape[0]
        device = batch["codes"].device
        start = self.embed(torch.full((b, 1), self.vocab.scan_start, device=device))
        parts = [start, self.scan_embeddings(batch).to(start.dtype)]
        suffix = 0
        if suffix_ids is not None:
            end = torch.full((b, 1), self.vocab.scan_end, device=device)
            tail = torch.cat([self.connectivity_ids(batch).to(device), end, suffix_ids], dim=1)
            parts.append(self.embed(tail))
            suffix = tail.shape[1]
        return torch.cat(parts, dim=1), suffix

    def positions(self, batch_size: int, suffix: int, device) -> torch.Tensor:
        ids = position_ids(self.n_steps, self.n_rois, suffix, self.position_mode)
        return ids.to(device)[None].expand(batch_size, -1)

    # ---- objectives

    def f2f_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over the K codes [B, (W-1) * N, K], targets [B, (W-1) * N]) on the block-causal layout."""
        embeds, _ = self.scan_sequence(batch, None)
        b, length = embeds.shape[:2]
        mask = additive_mask(block_causal_mask(self.n_steps, self.n_rois), embeds.dtype, b).to(embeds.device)
        where, targets = f2f_targets(batch["codes"])
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask,
                            position_ids=self.positions(b, 0, embeds.device),
                            output_hidden_states=self.input_mode == "features", use_cache=False)
        where = where.to(embeds.device)
        if self.input_mode == "tokens":
            first = self.vocab.first_id
            logits = out.logits[:, where, first: first + self.codebook_size]
        else:
            logits = self.adapter.code_head(out.hidden_states[-1][:, where])
        return logits.float(), targets

    def f2t_loss(self, batch: dict) -> torch.Tensor:
        """Scan, then the prompt and caption (`batch['suffix_ids']`); loss on the caption tokens only."""
        suffix_ids, suffix_labels = batch["suffix_ids"], batch["suffix_labels"]
        embeds, suffix = self.scan_sequence(batch, suffix_ids)
        b = embeds.shape[0]
        scan_len = embeds.shape[1] - suffix_ids.shape[1]
        attention = torch.cat([torch.ones(b, scan_len, dtype=torch.long, device=embeds.device),
                               batch["suffix_mask"].long()], dim=1)
        labels = torch.cat([torch.full((b, scan_len), IGNORE, dtype=torch.long, device=embeds.device),
                            suffix_labels], dim=1)
        # logits only where a caption token is predicted (the suffix and the token before it): the LM head over the
        # whole vocabulary at the W x N + P scan positions is most of a small model's step and carries no loss
        keep = suffix_ids.shape[1] + 1
        out = self.backbone(inputs_embeds=embeds, attention_mask=attention,
                            position_ids=self.positions(b, suffix, embeds.device), use_cache=False,
                            logits_to_keep=keep)
        return causal_lm_loss(out.logits, labels[:, -keep:])

    def t2t_loss(self, batch: dict) -> torch.Tensor:
        ids = batch["text_ids"]
        out = self.backbone(input_ids=ids, use_cache=False)
        return causal_lm_loss(out.logits, ids)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        total = None
        if self.weights.get("f2f", 0) > 0:
            logits, targets = self.f2f_logits(batch)
            losses["f2f"] = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            losses["f2f_accuracy"] = (logits.argmax(-1) == targets).float().mean().detach()
        if self.weights.get("f2t", 0) > 0:
            losses["f2t"] = self.f2t_loss(batch)
        if self.weights.get("t2t", 0) > 0 and "text_ids" in batch:
            losses["t2t"] = self.t2t_loss(batch)
        for name in ("f2f", "f2t", "t2t"):
            if name in losses:
                term = self.weights[name] * losses[name]
                total = term if total is None else total + term
        losses["loss"] = total
        return losses


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, fp32, positions labelled IGNORE skipped."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
