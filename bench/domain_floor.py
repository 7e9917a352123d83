"""What a converged classifier reads when it tells reference distributions from the text, in the domain
classifier's view: the floor under `val/domain_mlp_probe_accuracy` that no tokenizer can go below by the shape
of its latents alone.

    .venv/bin/python bench/domain_floor.py [--code-dim 32] [--k 512 2048] [--rows 4000]

The text side is what stage 1's classifier sees: token embeddings of the default LLM (SmolLM2), drawn with their
frequencies in the default text corpus, projected onto a code_dim-dimensional view (a random one, like `to_llm`
at initialisation, and the text's own frequency-weighted PCA, where the tokens spread most). Each reference set
is scored by `probe_accuracy(kind="mlp")`, the fresh MLP probe of validation (0.5 = indistinguishable):

- text: fresh draws of the text itself (the probe's own noise level);
- text + jitter: every draw moved by Gaussian noise of 0.2 / 1.0 times the median nearest-neighbour distance
  between distinct tokens (a continuous cloud around the right atoms with the right weights);
- Gaussian: a Gaussian with the text's mean and covariance;
- atoms, uniform: the same distinct tokens, drawn uniformly instead of by frequency;
- top-K, by frequency: only the K most frequent tokens, with their frequencies (latents sitting exactly on a
  codebook of K text tokens that are used as often as language uses them).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tokenizer_train.losses import probe_accuracy
from tokenizer_train.model import LLMProjection
from tokenizer_train.text import TextEmbeddingSampler, load_llm, read_text_corpus
from tokenizer_train.train import DEFAULT_TEXT_CORPUS


def gaussian_like(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of the Gaussian with the mean and covariance of ``x`` (in the span ``x`` fills)."""
    evals, evecs = torch.linalg.eigh(torch.cov(x.T.double()))
    root = evecs * evals.clamp_min(0).sqrt()
    return (x.mean(0).double() + torch.randn(n, x.shape[1], generator=generator, dtype=torch.float64) @ root.T).float()


def pca_view(embeddings: torch.Tensor, probs: torch.Tensor, dim: int) -> LLMProjection:
    """A `to_llm` whose `text_view` is the text's own PCA: weight = the top `dim` principal axes of the
    frequency-weighted text, bias = its mean."""
    e, p = embeddings.double(), probs.double() / probs.double().sum()
    mu = p @ e
    _, evecs = torch.linalg.eigh((e - mu).T @ ((e - mu) * p[:, None]))
    proj = LLMProjection(dim, e.shape[1])
    with torch.no_grad():
        proj.weight.copy_(evecs[:, -dim:])
        proj.bias.copy_(mu)
    return proj


def rows(probs: torch.Tensor, atoms: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` rows of ``atoms`` drawn with replacement in proportion to ``probs``."""
    return atoms[torch.multinomial(probs, n, replacement=True, generator=g)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code-dim", type=int, default=32, help="width of the view (the quality config's code_dim)")
    parser.add_argument("--k", type=int, nargs="+", default=[512, 2048], help="codebook sizes for the top-K rows")
    parser.add_argument("--rows", type=int, default=4000, help="rows per domain given to each probe")
    args = parser.parse_args()

    llm = load_llm(None, with_model=False)
    sampler = TextEmbeddingSampler.from_corpus(llm.tokenizer, llm.embeddings, read_text_corpus(DEFAULT_TEXT_CORPUS))
    probs, n = sampler.probs, args.rows
    perplexity = float(torch.exp(-(probs.double() * probs.double().log()).sum()))
    print(f"text: {len(probs)} distinct tokens, perplexity {perplexity:.0f}, top 100 tokens "
          f"{float(probs.sort(descending=True).values[:100].sum()):.0%} of draws; {n} rows per domain and probe")

    torch.manual_seed(0)
    views = {"random view": LLMProjection(args.code_dim, llm.embeddings.shape[1]),
             "text PCA view": pca_view(sampler.embeddings, probs, args.code_dim)}

    table: dict[str, dict[str, float]] = {}
    for view_name, view in views.items():
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            atoms = view.text_view(sampler.embeddings).float()
            basis, _ = torch.linalg.qr(view.weight)  # [llm_dim, code_dim]: the view's directions
        text = rows(probs, atoms, n, g)
        sub = atoms[torch.randperm(len(atoms), generator=g)[:2000]]
        dist = torch.cdist(sub, sub).fill_diagonal_(float("inf"))
        nn_dist = float(dist.min(1).values.median())
        ref = {"text (fresh draws)": rows(probs, atoms, n, g)}
        for frac in (0.2, 1.0):
            jitter = torch.randn(n, args.code_dim, generator=g) @ basis.T * (frac * nn_dist / np.sqrt(args.code_dim))
            ref[f"text + jitter {frac} x NN distance"] = rows(probs, atoms, n, g) + jitter
        ref["Gaussian, text's mean and covariance"] = gaussian_like(text, n, g)
        ref["atoms, uniform"] = atoms[torch.randint(len(atoms), (n,), generator=g)]
        order = torch.argsort(probs, descending=True)
        for k in args.k:
            top = torch.zeros_like(probs)
            top[order[:k]] = probs[order[:k]]
            ref[f"top-{k}, by frequency"] = rows(top / top.sum(), atoms, n, g)
        for name, x in ref.items():
            table.setdefault(name, {})[view_name] = probe_accuracy(x, text, seed=0, kind="mlp")
        print(f"{view_name}: median nearest-neighbour distance between tokens {nn_dist:.3f}", flush=True)

    print(f"\n{'reference set vs text (MLP probe accuracy)':<44}" + "".join(f"{v:>16}" for v in views))
    for name, cells in table.items():
        print(f"{name:<44}" + "".join(f"{cells[v]:>16.3f}" for v in views))


if __name__ == "__main__":
    main()
