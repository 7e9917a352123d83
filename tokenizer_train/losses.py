"""Stage-1 losses beside the reconstruction/commitment terms of the model (docs/design.md: kept apart from training).

Two ways of pulling the encoder's latents towards language:

- **domain-adversarial** (DANN): a small classifier tells fMRI latents (projected into the LLM embedding space) from
  the frozen LLM's text-token embeddings; a gradient-reversal layer sits between the two, so one backward pass
  trains the classifier to separate the domains and the encoder to make them inseparable.
- **SigLIP**: a sigmoid contrastive loss between a scan's pooled embedding and its caption's embedding.

Nothing here knows about the model or the trainer: inputs are plain tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # not imported by `import torch.distributed`
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------- gradient reversal


class GradientReversal(torch.autograd.Function):
    """Identity on the way forward; multiplies the incoming gradient by ``-lam`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = float(lam)
        # view_as gives a new autograd node; returning x itself would let autograd bypass this Function
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.lam, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, lam)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule, ``2 / (1 + exp(-gamma * p)) - 1``: 0 at the start, close to 1 by the end.

    ``progress`` is the fraction of training done (clamped to [0, 1]); starting at 0 keeps the noisy early
    classifier from steering the encoder before it has learnt anything.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# --------------------------------------------------------------------------------------------- domain classifier


class DomainClassifier(nn.Module):
    """MLP ``llm_dim -> hidden -> hidden -> 1``: the logit that a vector is an fMRI latent (1), not text (0)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, dim]`` -> logits ``[M]``."""
        return self.net(x).squeeze(-1)


def domain_classification_loss(classifier: nn.Module, fmri_latents: torch.Tensor, text_embeds: torch.Tensor,
                               noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's own objective, no reversal: balanced BCE, fMRI = 1, text = 0.

    Both sets go through the classifier in one call. "Balanced" = the mean BCE of each domain, averaged, so the
    two domains weigh the same whatever their sizes. Returns ``(loss, balanced accuracy)``; the accuracy is
    the mean of the per-domain accuracies (0.5 = chance, whatever M and M' are), detached.

    ``noise`` > 0 adds instance noise (Sonderby et al. 2016; Roth et al. 2017): both domains' rows get Gaussian
    noise with ``noise**2`` times the text's covariance (drawn as random combinations of up to 256 centred text
    rows, so it stays in the span the text fills) before the classifier sees them. Text token embeddings are a
    few thousand points and the fMRI latents a thin set; without noise the two supports barely overlap, a
    classifier can draw sharp boundaries around either, and its reversed gradient tells the encoder little about
    where the text lies. Blurring both by the same kernel leaves the classifier a smooth density ratio to learn
    (noise approximates a penalty on its input gradient) and gives the encoder a gradient towards the text's
    mass. Training only: the accuracy reported on validation is measured on clean inputs, which from noise 2 on
    a classifier fitted to noisy rows mostly answers by the blur, so that figure then says little (README).
    """
    fmri = fmri_latents.reshape(-1, fmri_latents.shape[-1])
    text = text_embeds.reshape(-1, text_embeds.shape[-1]).detach().to(fmri.dtype)
    if fmri.shape[0] == 0 or text.shape[0] == 0:
        raise ValueError(f"domain loss needs both domains, got {fmri.shape[0]} fMRI and {text.shape[0]} text rows")
    rows = torch.cat([fmri, text])
    if noise > 0:
        basis = text[:256] - text[:256].mean(dim=0)  # [k, d]; randn @ basis / sqrt(k - 1) ~ N(0, cov(text))
        mix = torch.randn(len(rows), len(basis), dtype=rows.dtype, device=rows.device)
        rows = rows + (noise / max(1, len(basis) - 1) ** 0.5) * (mix @ basis)
    logits = classifier(rows).float()  # the loss in fp32 whatever the weights' dtype
    logit_fmri, logit_text = logits[: fmri.shape[0]], logits[fmri.shape[0]:]
    loss = 0.5 * (F.binary_cross_entropy_with_logits(logit_fmri, torch.ones_like(logit_fmri))
                  + F.binary_cross_entropy_with_logits(logit_text, torch.zeros_like(logit_text)))
    with torch.no_grad():
        accuracy = 0.5 * ((logit_fmri > 0).float().mean() + (logit_text <= 0).float().mean())
    return loss, accuracy


def domain_loss(classifier: nn.Module, fmri_latents: torch.Tensor, text_embeds: torch.Tensor,
                lam: float, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain-adversarial loss: minimise it over encoder *and* classifier parameters in the same step.

    ``fmri_latents [M, d]`` (or ``[..., d]``, flattened) pass through the gradient-reversal layer, so the
    classifier's gradient is the ordinary one while everything upstream (projection, encoder) receives
    ``-lam`` times it and learns to fool the classifier. ``text_embeds [M', d]`` are the frozen LLM's token
    embeddings and are detached. Returns ``(loss, balanced accuracy)``, see `domain_classification_loss`.
    """
    return domain_classification_loss(classifier, grad_reverse(fmri_latents, lam), text_embeds, noise)


def moment_matching_loss(fmri_latents: torch.Tensor, text_embeds: torch.Tensor,
                         rel_eps: float = 1e-6) -> torch.Tensor:
    """Distance between the first two moments of fMRI latents ``[M, d]`` and text embeddings ``[M', d]``
    (detached), measured in the text's whitened coordinates: with ``S_t = U diag(l) U^T`` over the directions
    where the text varies (eigenvalues above ``rel_eps`` x the largest),

        ``|l^-1/2 U^T (mu_f - mu_t)|^2 + |l^-1/2 U^T S_f U l^-1/2 - I|_F^2 / r``

    (r such directions), 0 when means and covariances agree. Whitening matters: a linear probe separates the
    domains by any mean gap along a direction where both vary little, and latents that collapse onto fewer
    directions than the text spans sit apart from it however close their overall spread is. The adversarial
    classifier lags behind the encoder it chases, so its accuracy can sit near chance while such gaps remain;
    this term closes them directly (moment alignment as in Deep CORAL, Sun & Saenko 2016, with the means).
    """
    f = fmri_latents.reshape(-1, fmri_latents.shape[-1]).float()
    t = text_embeds.reshape(-1, text_embeds.shape[-1]).detach().float()
    if f.shape[0] < 2 or t.shape[0] < 2:
        raise ValueError(f"moment matching needs >= 2 rows per domain, got {f.shape[0]} fMRI and {t.shape[0]} text")
    mu_t = t.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(t.T))
    keep = evals > rel_eps * evals[-1].clamp_min(1e-30)
    whiten = evecs[:, keep] * evals[keep].rsqrt()  # [d, r]: text -> zero mean, identity covariance
    w = (f - mu_t) @ whiten
    mean = w.mean(0)
    cov = torch.cov(w.T).reshape(w.shape[1], w.shape[1])
    eye = torch.eye(w.shape[1], device=w.device)
    return mean.square().sum() + (cov - eye).square().sum() / w.shape[1]


@torch.no_grad()
def probe_accuracy(fmri_latents: torch.Tensor, text_embeds: torch.Tensor, seed: int = 0,
                   kind: str = "linear") -> float:
    """Held-out accuracy of a fresh probe telling fMRI latents from text: fitted on half of each domain, scored
    balanced on the other half. Unlike the adversarial classifier, which trails the encoder it is trained
    against, a probe answers "can these two sets be told apart?" at the time of asking.

    ``kind``: ``"linear"`` (logistic regression) sees gaps in the first two moments; ``"mlp"`` (two hidden
    layers of 256, trained to convergence with early stopping) also sees what differs beyond them (a thinner
    manifold, a different spread of lengths, the text's frequent tokens). Both are fitted on standardised
    features; the MLP on equal numbers of rows per domain (it has no class weights).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    if kind not in ("linear", "mlp"):
        raise ValueError(f"probe kind must be 'linear' or 'mlp', got {kind!r}")
    f = fmri_latents.reshape(-1, fmri_latents.shape[-1]).float().cpu().numpy()
    t = text_embeds.reshape(-1, text_embeds.shape[-1]).float().cpu().numpy()
    rng = np.random.default_rng(seed)
    f, t = f[rng.permutation(len(f))], t[rng.permutation(len(t))]
    fh, th = len(f) // 2, len(t) // 2
    if min(fh, th) < 1:
        raise ValueError(f"probe needs >= 2 rows per domain, got {len(f)} fMRI and {len(t)} text")
    if kind == "mlp":
        fh = th = min(fh, th)
    x = np.concatenate([f[:fh], t[:th]])
    y = np.r_[np.ones(fh), np.zeros(th)]
    mean, std = x.mean(0), x.std(0) + 1e-8
    if kind == "linear":
        probe = LogisticRegression(max_iter=1000, class_weight="balanced")
    else:  # early stopping holds out 10 % of the fit half: only with enough rows for that
        probe = MLPClassifier((256, 256), early_stopping=fh >= 50, max_iter=200, random_state=seed)
    with warnings.catch_warnings():  # a probe that stops at max_iter is still a probe
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit((x - mean) / std, y)
    acc_f = probe.predict((f[fh:] - mean) / std).mean()
    acc_t = 1 - probe.predict((t[th:] - mean) / std).mean()
    return float(0.5 * (acc_f + acc_t))


# --------------------------------------------------------------------------------------------- SigLIP


def _gather_with_grad(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated in rank order (gradients flow back to their owners) and this rank's offset.

    Local batches may differ in size (a ragged last batch): sizes are exchanged first, rows padded to the
    largest, gathered, then trimmed.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0])) if x.shape[0] < longest else x
    with warnings.catch_warnings():
        # deprecated in favour of _functional_collectives.all_gather_single (private, torch >= 2.6); this one
        # works on every torch we support and has a real backward (reduce-scatter / all-to-all)
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


class ScanEmbedding(nn.Module):
    """A scan's embedding for the SigLIP loss, pooled from its token latents ``u [B, W, N, c]`` (the trainer
    gives the l2-normalised quantiser inputs, whose nearest codes are the tokens: on the synthetic cohort they
    kept more of the connectivity than the code vectors themselves).

    Captions describe connectivity: how strongly the ROIs of a network move together and with other networks.
    A plain mean of the tokens cannot express that (shuffle the ROIs within a time step and it stays the same),
    so the pooling is second order: per time step the ROI mean is removed and the ROIs are summed into G groups
    by a learned assignment ``A [N, G]`` (initialised from the atlas networks when the corpus names them), and
    the group covariance ``S = mean_w g_w g_w^T`` (over code channels) says how coherent each group is and how
    it moves with the others. Upper triangle of S and the mean token -> per-feature standardisation -> MLP ->
    ``out_dim``.

    The standardisation is a BatchNorm without affine terms (running statistics at eval time): the within-group
    terms are an order of magnitude larger than the between-group ones, and a LayerNorm across features let the
    head see little else. With a few hundred to a few thousand training captions the head must stay small:
    heads fitted on a trained tokenizer's fixed features of 960 synthetic scans retrieved val captions at
    R@5 0.10-0.15 (of 120) this way, 0.05-0.09 with a LayerNorm and a 576-wide head, and worse again with
    per-network channel powers added (more features than the captions can pin down).
    """

    def __init__(self, n_rois: int, code_dim: int, out_dim: int, groups: torch.Tensor | int = 16):
        super().__init__()
        if isinstance(groups, int):
            assign = torch.randn(n_rois, groups) / math.sqrt(n_rois)
        else:
            assign = torch.as_tensor(groups, dtype=torch.float32)
            if assign.ndim != 2 or assign.shape[0] != n_rois:
                raise ValueError(f"ROI groups must be [n_rois={n_rois}, G], got {tuple(assign.shape)}")
            assign = assign / assign.sum(0, keepdim=True).clamp_min(1.0)  # group means
        self.assign = nn.Parameter(assign)
        n_groups = assign.shape[1]
        self.register_buffer("upper", torch.triu_indices(n_groups, n_groups), persistent=False)
        features = n_groups * (n_groups + 1) // 2 + code_dim
        self.net = nn.Sequential(nn.BatchNorm1d(features, affine=False), nn.Linear(features, out_dim), nn.GELU(),
                                 nn.Linear(out_dim, out_dim))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, W, N, c]`` -> ``[B, G(G+1)/2 + c]``: group covariances, then the mean token."""
        centred = tokens - tokens.mean(dim=2, keepdim=True)
        groups = torch.einsum("bwnc,ng->bwgc", centred, self.assign.to(tokens.dtype))
        cov = torch.einsum("bwgc,bwhc->bgh", groups, groups) / tokens.shape[1]
        return torch.cat([cov[:, self.upper[0], self.upper[1]], tokens.mean(dim=(1, 2))], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(tokens))


class SigLipLoss(nn.Module):
    """Sigmoid contrastive loss (Zhai et al. 2023) between scan and caption embeddings.

    Every (scan, caption) pair is an independent binary problem: ``logit = exp(t') * <s, c> + b`` on
    l2-normalised vectors, label +1 for a scan's own caption and -1 for every other caption, loss
    ``-log sigmoid(label * logit)``. ``t'`` (log temperature, init log 10) and ``b`` (init -10, so the many
    negatives start near their target) are learnt.

    Normalisation: the summed pair losses are divided by the number of positive pairs (the batch size), i.e.
    the value is the mean loss *per positive pair*, as in the paper.

    Distributed: when torch.distributed is initialised (world > 1), both sides are all-gathered with
    gradient; each rank scores its own scans against all captions and its own captions against all scans
    (positives on the diagonal of its local block) and returns ``(row block + column block) / (2 b)``. The
    blocks of all ranks cover every pair of the global batch twice, so the mean of the ranks' losses equals
    the single-process loss over the concatenated batch, and DDP's gradient averaging yields exactly the
    single-process gradient (the gather's backward sums every rank's contribution into the owner's input).
    """

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0,
                 gather: bool = True, group=None):
        super().__init__()
        # shape [1], not 0-d: DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot give
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))
        self.gather = gather
        self.group = group

    def _pair_loss_sum(self, a: torch.Tensor, b: torch.Tensor, offset: int) -> torch.Tensor:
        """Summed sigmoid loss of ``a [n, d]`` against ``b [m, d]``; ``a[i]``'s positive is ``b[offset + i]``."""
        logits = self.logit_scale.exp() * (a @ b.T) + self.logit_bias
        labels = torch.full_like(logits, -1.0)
        idx = torch.arange(a.shape[0], device=a.device)
        labels[idx, idx + offset] = 1.0
        return -F.logsigmoid(labels * logits).sum()

    def forward(self, scan_emb: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
        """``scan_emb [b, d]``, ``caption_emb [b, d]`` (row i of each belongs to the same scan) -> scalar."""
        if scan_emb.shape != caption_emb.shape:
            raise ValueError(f"scan and caption embeddings differ in shape: {tuple(scan_emb.shape)} vs "
                             f"{tuple(caption_emb.shape)}")
        scans = F.normalize(scan_emb.float(), dim=-1)  # the loss in fp32 whatever the heads' dtype
        captions = F.normalize(caption_emb.float(), dim=-1)
        n = scans.shape[0]
        distributed = (self.gather and dist.is_available() and dist.is_initialized()
                       and dist.get_world_size(self.group) > 1)
        if not distributed:
            return self._pair_loss_sum(scans, captions, 0) / n
        all_scans, offset = _gather_with_grad(scans, self.group)
        all_captions, _ = _gather_with_grad(captions, self.group)
        rows = self._pair_loss_sum(scans, all_captions, offset)
        cols = self._pair_loss_sum(captions, all_scans, offset)  # the pair loss is symmetric in its two sides
        return (rows + cols) / (2 * n)


# --------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def retrieval_recall(scan_emb: torch.Tensor, caption_emb: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Scan-to-caption retrieval by cosine similarity: the share of scans whose own caption (same row) is among
    the k most similar captions. Keys ``R@{k}`` (not MLflow-safe: rename before logging). Ties count against
    the scan. Row i of both inputs belongs to scan i; identical captions of different scans count as misses."""
    scans = F.normalize(scan_emb.float(), dim=-1)
    captions = F.normalize(caption_emb.float(), dim=-1)
    sim = scans @ captions.T
    own = sim.diagonal().unsqueeze(1)
    # rank of the true caption = how many others score at least as high (the diagonal itself excluded)
    rank = (sim >= own).sum(dim=1) - 1
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}
