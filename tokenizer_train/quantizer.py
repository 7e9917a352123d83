"""Vector quantiser of the brain tokenizer: cosine lookup, straight-through gradients, EMA codebook.

The codebook is not trained by the optimizer. It lives in buffers (the normalised codes, the EMA cluster sizes
and the EMA sums of the latents assigned to each code) that move only in training mode, under `no_grad`:

- first training batch (if `kmeans_init`): spherical k-means on that batch's latents;
- every training batch: EMA of per-code counts and sums; a code is the direction of its EMA sum;
- dead codes (EMA count below `dead_code_threshold`) restart from random latents of the current batch.

Counts are in vectors per (global) batch, so the threshold is too: 1e-3 means "unused for hundreds of steps".
Under torch.distributed the counts and sums are all-reduced and k-means / restarts are broadcast from rank 0,
so every rank holds the same codebook (DeepSpeed does not sync buffers for us, DDP would only from rank 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

_CHUNK = 16384  # rows per similarity block: K = 8192 x 144k latents at once would be 4.7 GB


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the most cosine-similar code for each row of `z` [M, D] (both l2-normalised), in chunks."""
    with torch.autocast(z.device.type, enabled=False):  # bf16 similarities would tie among thousands of codes
        return torch.cat([(chunk @ codebook.t()).argmax(dim=-1) for chunk in z.split(_CHUNK)])


def code_stats(codes: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage (fraction of the codebook hit by `codes`) and perplexity (exp of the entropy of code frequencies)."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, code_dim: int, ema_decay: float = 0.99, kmeans_init: bool = True,
                 kmeans_iters: int = 10, dead_code_threshold: float = 1e-3):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.ema_decay, self.kmeans_iters, self.dead_code_threshold = ema_decay, kmeans_iters, dead_code_threshold
        embed = F.normalize(torch.randn(codebook_size, code_dim), dim=-1)
        self.register_buffer("embed", embed)                        # [K, D], unit rows
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA of vectors per code per batch
        self.register_buffer("embed_sum", embed.clone())            # EMA of the sum of latents per code
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def _apply(self, fn, recurse=True):
        # Mixed-precision engines (DeepSpeed bf16, module.half()) cast whole modules; an EMA with decay 0.99
        # needs float32, so the codebook state stays float32 whatever happens to the rest of the model.
        super()._apply(fn, recurse)
        for name in ("embed", "cluster_size", "embed_sum"):
            setattr(self, name, getattr(self, name).float())
        return self

    @property
    def codebook(self) -> Tensor:
        """The normalised codes, [K, code_dim]."""
        return self.embed

    def lookup(self, codes: Tensor) -> Tensor:
        """Code vectors for integer codes of any shape -> [..., code_dim]."""
        return F.embedding(codes, self.embed)

    def quantize(self, z: Tensor) -> Tensor:
        """Codes of latents `z` [..., code_dim] (normalised here), no update of any state."""
        flat = F.normalize(z.detach().float().reshape(-1, self.code_dim), dim=-1)
        return nearest_code(flat, self.embed).view(z.shape[:-1])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z [..., code_dim] -> (quantized with STE, codes [...], commitment loss, batch stats).

        The commitment loss is mean over vectors of ||sg(q) - z||^2, both normalised (so it lies in [0, 4]).
        """
        dtype = z.dtype
        z = F.normalize(z.float(), dim=-1)
        flat = z.reshape(-1, self.code_dim)
        if self.training and not bool(self.initialized):
            self._kmeans_init(flat.detach())
        codes = nearest_code(flat.detach(), self.embed)
        q = self.lookup(codes).view_as(z)  # a copy: the vectors the codes were chosen by, before the EMA step
        if self.training:
            self._ema_update(flat.detach(), codes)
        commit_loss = (q.detach() - z).pow(2).sum(-1).mean()
        quantized = z + (q - z).detach()  # straight-through: forward is q, backward is identity to z
        return quantized.to(dtype), codes.view(z.shape[:-1]), commit_loss, code_stats(codes, self.codebook_size)

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor) -> None:
        """Spherical k-means on this batch's latents (rank 0's, broadcast); sampled with replacement if too few."""
        k = self.codebook_size
        idx = torch.randperm(len(z), device=z.device)[:k] if len(z) >= k else \
            torch.randint(len(z), (k,), device=z.device)
        centroids = z[idx].clone()
        for _ in range(self.kmeans_iters):
            assign = nearest_code(z, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assign, z)
            counts = torch.bincount(assign, minlength=k)
            # An empty cluster keeps its centroid; the dead-code restart deals with it later.
            centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centroids)
        counts = torch.bincount(nearest_code(z, centroids), minlength=k).float()
        self.embed.copy_(centroids)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.cluster_size.copy_(counts)
        self.initialized.fill_(True)
        self._broadcast()

    @torch.no_grad()
    def _ema_update(self, z: Tensor, codes: Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        norm = self.embed_sum.norm(dim=-1, keepdim=True)
        # A code nobody used keeps its direction even after its EMA sum has decayed towards zero.
        self.embed.copy_(torch.where(norm > 1e-12, self.embed_sum / norm.clamp_min(1e-12), self.embed))
        self._restart_dead_codes(z)

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())  # identical on every rank: cluster_size was all-reduced
        if n_dead == 0:
            return
        fresh = z[torch.randint(len(z), (n_dead,), device=z.device)]
        reset = max(1.0, self.dead_code_threshold)  # as if one latent had just used it
        self.embed[dead] = fresh
        self.embed_sum[dead] = fresh * reset
        self.cluster_size[dead] = reset
        self._broadcast()

    def _broadcast(self) -> None:
        if _distributed():
            for buf in (self.embed, self.embed_sum, self.cluster_size):
                dist.broadcast(buf, src=0)
