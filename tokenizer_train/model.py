"""The brain tokenizer: ROI time series X [T, N] -> discrete codes [W, N] a pretrained LLM can read.

    X [B, T, N] --pad T to W*P--> patches [B, W, N, P] --Linear(P, dim)--> + ROI embedding + time-step embedding
      -> tokens [B, W*N, dim] -> pre-norm Transformer encoder -> Linear(dim, code_dim) = quantiser inputs z
      -> VectorQuantizer (cosine lookup on z / |z|) -> codes [B, W, N]
      -> code vectors -> to_llm -> the LLM's embedding space (llm_dim)
      -> light Transformer decoder -> Linear(dim, P) -> X_hat [B, T, N]

The domain classifier of stage 1 compares to_llm(z) with text-token embeddings seen through `LLMProjection.
text_view` (see there: why a code space narrower than the LLM's needs it).

Token order is TIME-MAJOR, the F2F convention of the whole system (docs/design.md): the token of step w (patch
w*P..w*P+P-1 along time) and ROI n (atlas order) sits at sequence index `token_index(w, n, N) = w * N + n`.
So `codes.reshape(B, W * N)` is the sequence stage 2 feeds the LLM, one step's N ROI tokens after another.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer_train.config import TokenizerModelConfig
from tokenizer_train.quantizer import VectorQuantizer


def token_index(w: int, n: int, n_rois: int) -> int:
    """Sequence index of the token of time step w and ROI n (time-major)."""
    return w * n_rois + n


def token_position(index: int, n_rois: int) -> tuple[int, int]:
    """Inverse of `token_index`: (w, n)."""
    return divmod(index, n_rois)


@dataclass
class TokenizerOutput:
    codes: Tensor          # [B, W, N] long
    quantized: Tensor      # [B, W, N, code_dim], code vectors with straight-through gradients
    pre_quant: Tensor      # [B, W, N, code_dim], l2-normalised quantiser inputs (what the lookup compares)
    llm_tokens: Tensor     # [B, W, N, llm_dim] = to_llm(quantized)
    llm_latents: Tensor    # [B, W, N, llm_dim] = to_llm(z), z the raw quantiser inputs: the domain classifier's fMRI
    text_view: Tensor | None  # [M, llm_dim]: the text embeddings given to forward, as the classifier sees them
    pooled: Tensor         # [B, llm_dim], mean of llm_tokens over W and N (stage 1's SigLIP uses ScanEmbedding)
    recon: Tensor          # [B, T, N]
    commit_loss: Tensor    # scalar
    vq_stats: dict[str, Tensor]  # usage, perplexity of the batch's codes


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    """Pre-norm Transformer block; full (bidirectional) attention over all W*N tokens of a scan."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PositionEmbedding(nn.Module):
    """Time-step embedding [W, dim] + ROI embedding [N, dim] (learned, or given by the caller).

    A module of its own, not bare parameters of BrainTokenizer: DeepSpeed ZeRO-3 gathers a module's parameters
    around that module's calls, and BrainTokenizer returns a dataclass its backward hooks cannot see into.
    """

    def __init__(self, n_steps: int, n_rois: int, dim: int, learned_roi: bool):
        super().__init__()
        self.time = nn.Parameter(torch.randn(n_steps, dim) * 0.02)
        self.roi = nn.Parameter(torch.randn(n_rois, dim) * 0.02) if learned_roi else None

    def forward(self, roi: Tensor | None = None) -> Tensor:
        roi = self.roi if roi is None else roi
        return self.time[:, None, :] + roi[None, :, :]


class LLMProjection(nn.Linear):
    """`to_llm`: code space (code_dim) -> the LLM's embedding space (llm_dim), and the classifier's view of text.

    With code_dim < llm_dim everything the tokenizer puts into the LLM's space lies in the code_dim-dimensional
    affine subspace {W c + b}. Text-token embeddings spread over all llm_dim dimensions, so a domain classifier
    shown them whole wins from the dimensions no code can reach, and its reversed gradient can teach the encoder
    nothing. `text_view` therefore projects text embeddings orthogonally onto that subspace,
    ``b + Q Q^T (t - b)`` with Q an orthonormal basis of W's columns (detached: the text side is a fixed target),
    and the two domains are compared where they can meet. With code_dim >= llm_dim the view is the identity.

    `forward(x, text)` returns ``(to_llm(x), text_view(text))`` in one call: DeepSpeed ZeRO-3 gathers W and b
    only inside this module's forward.
    """

    def forward(self, x: Tensor, text: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        y = super().forward(x)
        return y if text is None else (y, self.text_view(text))

    def text_view(self, text: Tensor) -> Tensor:
        if self.in_features >= self.out_features:
            return text
        basis, _ = torch.linalg.qr(self.weight.detach().float())  # [llm_dim, code_dim], orthonormal columns
        bias = self.bias.detach().float()
        centred = text.detach().float() - bias
        return (bias + (centred @ basis) @ basis.T).to(text.dtype)


class BrainTokenizer(nn.Module):
    def __init__(self, config: TokenizerModelConfig, roi_gradients: np.ndarray | Tensor | None = None):
        super().__init__()
        c = self.config = config
        self.n_steps = math.ceil(c.length / c.patch)  # W

        self.patch_embed = nn.Linear(c.patch, c.dim)
        self.pos = PositionEmbedding(self.n_steps, c.n_rois, c.dim, learned_roi=c.roi_embedding == "learned")
        if c.roi_embedding != "learned":  # fixed gradients [N, k] (z-scored columns), through a learned Linear(k, dim)
            self.register_buffer("roi_gradients", None)
            self.register_module("roi_proj", None)
            if roi_gradients is not None:
                self.set_roi_gradients(roi_gradients)
        self.encoder = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.dim)
        self.to_code = nn.Linear(c.dim, c.code_dim)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, c.ema_decay, c.kmeans_init,
                                         c.kmeans_iters, c.dead_code_threshold)
        self.to_llm = LLMProjection(c.code_dim, c.llm_dim)
        self.from_code = nn.Linear(c.code_dim, c.dim)
        self.decoder = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.dim)
        self.to_patch = nn.Linear(c.dim, c.patch)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def set_roi_gradients(self, gradients: np.ndarray | Tensor) -> None:
        """Fix the ROI embedding to `gradients` [N, k] (call before building the optimizer: k sets roi_proj)."""
        if self.config.roi_embedding != "gradients":
            raise ValueError("roi_embedding is 'learned'; ROI gradients are used only with roi_embedding='gradients'")
        g = torch.as_tensor(gradients, dtype=torch.float64).cpu()
        if g.ndim != 2 or g.shape[0] != self.config.n_rois:
            raise ValueError(f"ROI gradients must be [n_rois={self.config.n_rois}, k], got {tuple(g.shape)}")
        g = (g - g.mean(0)) / g.std(0, correction=0).clamp_min(1e-8)  # diffusion-map gradients have tiny scales
        weight = self.patch_embed.weight
        self.roi_gradients = g.to(device=weight.device, dtype=weight.dtype)
        if self.roi_proj is None or self.roi_proj.in_features != g.shape[1]:
            self.roi_proj = nn.Linear(g.shape[1], self.config.dim, device=weight.device, dtype=weight.dtype)
            self._init_weights(self.roi_proj)

    def positions(self) -> Tensor:
        """Embedding of every (step, ROI) position, [W, N, dim]; shared by encoder and decoder input."""
        if self.config.roi_embedding == "learned":
            return self.pos()
        if self.roi_gradients is None:
            raise RuntimeError("roi_embedding='gradients' but no gradients were given: call set_roi_gradients")
        return self.pos(self.roi_proj(self.roi_gradients))

    # Patches and the time-major token order

    def patchify(self, x: Tensor) -> Tensor:
        """X [B, T, N] -> patches [B, W, N, P] (T zero-padded to W*P)."""
        c = self.config
        if x.ndim != 3 or x.shape[1:] != (c.length, c.n_rois):
            raise ValueError(f"expected X [B, T={c.length}, N={c.n_rois}], got {tuple(x.shape)}")
        x = F.pad(x, (0, 0, 0, self.n_steps * c.patch - c.length))
        return x.view(x.shape[0], self.n_steps, c.patch, c.n_rois).transpose(2, 3)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Patches [B, W, N, P] -> X [B, T, N] (padding cropped)."""
        b = patches.shape[0]
        return patches.transpose(2, 3).reshape(b, self.n_steps * self.config.patch, -1)[:, : self.config.length]

    def embed_tokens(self, x: Tensor) -> Tensor:
        """X [B, T, N] -> encoder input tokens [B, W*N, dim] in time-major order (index = w * N + n)."""
        tokens = self.patch_embed(self.patchify(x)) + self.positions()
        return tokens.flatten(1, 2)  # [B, W, N, dim] -> [B, W*N, dim]: n varies fastest

    # Encoder / decoder

    def quantizer_inputs(self, x: Tensor) -> Tensor:
        """X [B, T, N] -> z [B, W, N, code_dim], the encoder output the quantiser receives (not normalised)."""
        h = self.embed_tokens(x)
        for block in self.encoder:
            h = block(h)
        return self.to_code(self.encoder_norm(h)).view(x.shape[0], self.n_steps, self.config.n_rois, -1)

    def encode_latents(self, x: Tensor) -> Tensor:
        """X [B, T, N] -> l2-normalised quantiser inputs [B, W, N, code_dim] (the cosine lookup's view of z)."""
        return F.normalize(self.quantizer_inputs(x), dim=-1)

    def decode_vectors(self, quantized: Tensor) -> Tensor:
        """Code vectors [B, W, N, code_dim] -> X_hat [B, T, N]."""
        h = (self.from_code(quantized) + self.positions()).flatten(1, 2)
        for block in self.decoder:
            h = block(h)
        patches = self.to_patch(self.decoder_norm(h))
        return self.unpatchify(patches.view(*quantized.shape[:3], self.config.patch))

    def forward(self, x: Tensor, text: Tensor | None = None) -> TokenizerOutput:
        """X [B, T, N] (and text-token embeddings [M, llm_dim] for the domain classifier) -> TokenizerOutput.
        In training mode the codebook's EMA state moves (see quantizer). Inputs take the weights' dtype (bf16 under
        DeepSpeed on GPU); the codebook stays fp32 (see quantizer)."""
        dtype = self.patch_embed.weight.dtype
        x = x.to(dtype)
        text = None if text is None else text.to(dtype)
        z = self.quantizer_inputs(x)
        quantized, codes, commit_loss, stats = self.quantizer(z)  # normalises z for the cosine lookup
        llm_tokens = self.to_llm(quantized)
        if text is None:
            llm_latents, text_view = self.to_llm(z), None
        else:
            llm_latents, text_view = self.to_llm(z, text)
        return TokenizerOutput(
            codes=codes, quantized=quantized, pre_quant=F.normalize(z, dim=-1), llm_tokens=llm_tokens,
            llm_latents=llm_latents, text_view=text_view, pooled=llm_tokens.mean(dim=(1, 2)),
            recon=self.decode_vectors(quantized), commit_loss=commit_loss, vq_stats=stats)

    # The exported interface (docs/design.md)

    @torch.no_grad()
    def encode(self, x: Tensor | np.ndarray) -> Tensor:
        """X [T, N] or [B, T, N] -> codes [W, N] or [B, W, N] (long in [0, K)); eval mode, no codebook update."""
        weight = self.patch_embed.weight
        x = torch.as_tensor(x).to(device=weight.device, dtype=weight.dtype)
        single = x.ndim == 2
        with _eval(self):
            codes = self.quantizer.quantize(self.encode_latents(x[None] if single else x))
        return codes[0] if single else codes

    @torch.no_grad()
    def decode(self, codes: Tensor | np.ndarray) -> Tensor:
        """Codes [W, N] or [B, W, N] -> X_hat [T, N] or [B, T, N]."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.patch_embed.weight.device)
        single = codes.ndim == 2
        codes = codes[None] if single else codes
        if codes.shape[1:] != (self.n_steps, self.config.n_rois):
            raise ValueError(f"expected codes [B, W={self.n_steps}, N={self.config.n_rois}], got {tuple(codes.shape)}")
        with _eval(self):
            x_hat = self.decode_vectors(self.quantizer.lookup(codes).to(self.from_code.weight.dtype))
        return x_hat[0] if single else x_hat

    @property
    def codebook(self) -> Tensor:
        """The codes in the LLM's embedding space, [K, llm_dim] = to_llm(normalised codebook); detached."""
        with torch.no_grad():
            return self.to_llm(self.quantizer.codebook.to(self.to_llm.weight.dtype))

    def save_pretrained(self, directory: str | Path) -> Path:
        from tokenizer_train.export import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> BrainTokenizer:
        from tokenizer_train.export import load_pretrained

        return load_pretrained(cls, directory, device)


@contextmanager
def _eval(module: nn.Module):
    """Eval mode for the duration of a block (no dropout, no codebook update), then the previous mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
