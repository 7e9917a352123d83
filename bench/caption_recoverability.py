"""What the tokens can say: for every caption claim, can a linear probe read its value from what stage 2 gives the LLM?

    .venv/bin/python bench/caption_recoverability.py [--corpus runs/llm-quality/corpus]
        [--tokenizer runs/llm-quality/tokenizer/tokenizer] [--bins 4] [--heldout val]
        [--out runs/llm-quality/recoverable.json]

Why: caption fidelity at the shuffled-scan control can mean the LLM did not learn, or that the claim is not in the
scan tokens at all. A claim the tokens do not carry cannot be written by any stage 2, so fidelity is reported on all
claims and on the *recoverable* ones (those this bench finds in the tokens). No LLM is involved: under a minute of
CPU on the 400-subject bench corpus.

A claim is a name of `corpus_builder.captions.caption_claims` (e.g. `fc_within_Vis`, `most_coupled_pair`); its value
a bin ("higher"), a network pair or a network. Bins are intervals of a descriptor's z and the pair / network claims
are the arg-max / arg-min of 28 pair z / 7 within-network z, so a one-vs-rest linear classifier cannot express them
(it cannot single out the middle bin "typical"). The probe therefore predicts the z-values (the 23 descriptors and
28 pair values against the corpus norms: the numbers the caption was written from) by ridge regression fitted on
the train split, each target's penalty by efficient leave-one-out on train, and *writes the caption* from them with
the corpus's own writer (`caption_for`), whose claims are read back with `caption_claims`: a probe's claim means
exactly what a caption's does (written from the true z, the claims equal the captions' on 100 % of scans; the
bench prints that check). Accuracy per claim is measured on the held-out scans (`--heldout`, default the val split
stage 2 validates on) beside the *majority* value (the train split's most common value: what the constant caption
says). Views of a scan:

  codes         per ROI the counts of each of the K codes (N x K) and the mean of its W codes' codebook rows (the
                LLM's initial embedding of them, on the codebook's principal axes)
  codes_fc      each ROI's W codebook rows as one vector, correlated between ROIs (Fisher z): the codes' own "FC"
  connectivity  the connectivity tokens (`llm_train.connectivity`) as one-hot levels, P network pairs x bins
  given         what the LLM is given, read linearly: per target, the best on train (leave-one-out) of the three
                views above and of their concatenation; this view decides recoverability
  fc, spectrum  (references, not given to the LLM) the Fisher-z FC of the series (upper triangle), and each ROI's
                log power share in 8 frequency bands: what a layout carrying them could carry

Recoverable = the lower end of the 95 % paired bootstrap interval (over held-out scans) of given-probe accuracy minus
majority accuracy is above 0. The JSON (`--out`) holds per claim its figures and a `recoverable` flag, and the list
`recoverable` of claim names (`bench/stage2_learnability.py` scores caption fidelity on them).

Measured on runs/llm-quality (400 synthetic subjects, 32 ROIs, W 5, K 512; 320 train / 40 val scans), the shipped
4 connectivity levels: 4 of 27 claims recoverable (most/least coupled pair, within-network most/least); the 8
fc_within / subcortical-cortical claims gain 0.05-0.15 over majority from the connectivity tokens but not clearly
at 40 scans. The codes alone carry nothing a linear probe reads (every claim at majority): a code is a patch of
one ROI, and the claims are about how ROIs move together. With `--bins 8` (same tokens, 8 quantile levels instead
of 4): 10 of 27 (adds subcortical-cortical and 5 fc_within); with 8 bins and `--heldout val,test` (80 scans): 12.
Why more levels help: caption bins cut z at +-1 and +-2 (the 16th / 84th percentiles and the tails), which quartile
levels cannot resolve. No view recovers the 7 fALFF claims, not
even the series' per-ROI spectrum: fALFF is the amplitude spectrum of a network's dual-regression time course (a
weighted sum of ROIs, so cross-ROI spectra matter too) in 0.01-0.08 Hz over all of (0, 0.25 Hz], a ratio no linear
reading of per-ROI band powers, codes or FC gives; nor are the nonlinear graph / gradient claims (clustering,
modularity, g1 explained) linear in the whole FC. Carrying them needs tokens made for them (e.g. a per-network
fALFF level token beside the connectivity tokens), not more stage-1 training.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from sklearn.linear_model import RidgeCV

from corpus_builder.captions import caption_claims, caption_for
from corpus_builder.config import CaptionConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES
from corpus_builder.readers import open_zarr, read_captions, split_keys
from llm_train.connectivity import ConnectivityTokens, fit_on_corpus
from llm_train.train import load_brain_tokenizer

ALPHAS = np.logspace(-1, 4, 11)
VIEWS = ("codes", "codes_fc", "connectivity", "given", "fc", "spectrum")
GIVEN_BLOCKS = ("codes", "codes_fc", "connectivity")


def claim_table(captions: list[str]) -> dict[str, list[str | None]]:
    """Claim name -> the value each caption gives it (None where a caption does not make that claim)."""
    per_scan = [dict(caption_claims(c)) for c in captions]
    names = sorted({n for claims in per_scan for n in claims if not n.startswith("?")})
    return {n: [claims.get(n) for claims in per_scan] for n in names}


def fisher_fc(x: np.ndarray) -> np.ndarray:
    """[B, T', N] -> [B, N (N - 1) / 2] Fisher z of the correlations between the N columns (upper triangle)."""
    n = x.shape[-1]
    iu = np.triu_indices(n, 1)
    return np.stack([np.arctanh(np.clip(np.corrcoef(s.T), -0.999, 0.999))[iu] for s in x])


def band_power(x: np.ndarray, tr: float = 2.0, edges=(0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25)):
    """[B, T, N] -> [B, N x bands] log share of each ROI's periodogram power per frequency band."""
    freqs = np.fft.rfftfreq(x.shape[1], tr)
    power = np.abs(np.fft.rfft(x - x.mean(1, keepdims=True), axis=1)) ** 2   # [B, F, N]
    total = power[:, 1:].sum(1, keepdims=True)
    bands = [power[:, (freqs > lo) & (freqs <= hi)].sum(1) for lo, hi in zip(edges[:-1], edges[1:])]
    return np.log(np.stack(bands, -1) / total.transpose(0, 2, 1) + 1e-6).reshape(len(x), -1)


@torch.no_grad()
def scan_views(keys: list[str], corpus: Path, brain_tokenizer, connectivity: ConnectivityTokens,
               basis: torch.Tensor, batch: int = 32) -> dict[str, np.ndarray]:
    """The views of the named scans (module doc), each [S, features]. `basis`: [llm_dim, r] principal axes of the
    codebook."""
    zarr = open_zarr(corpus)
    k = brain_tokenizer.config.codebook_size
    codebook = brain_tokenizer.codebook.float() @ basis  # [K, r]
    parts: dict[str, list[np.ndarray]] = {v: [] for v in ("counts", "means", "codes_fc", "connectivity", "fc",
                                                           "spectrum")}
    for i in range(0, len(keys), batch):
        x = torch.from_numpy(zarr.batch(keys[i:i + batch]).astype(np.float32))
        codes = brain_tokenizer.encode(x)                                   # [B, W, N]
        b, w, n = codes.shape
        flat = ((torch.arange(n) * k)[None, None] + codes).flatten(1)      # per-ROI one-hot index
        parts["counts"].append(torch.zeros(b, n * k).scatter_add_(1, flat, torch.ones(flat.shape)).numpy())
        rows = codebook[codes]                                              # [B, W, N, r]
        parts["means"].append(rows.mean(1).flatten(1).numpy())
        # each ROI's W code rows as one vector, correlated between ROIs: the codes' own "FC"
        parts["codes_fc"].append(fisher_fc(rows.permute(0, 1, 3, 2).reshape(b, w * rows.shape[-1], n).numpy()))
        levels = connectivity.levels(x)                                     # [B, P]
        parts["connectivity"].append(torch.nn.functional.one_hot(levels, connectivity.bins).flatten(1).numpy())
        parts["fc"].append(fisher_fc(x.double().numpy()))
        parts["spectrum"].append(band_power(x.double().numpy()))
    out = {v: np.concatenate(p).astype(np.float64) for v, p in parts.items()}
    out["codes"] = np.concatenate([out.pop("counts"), out.pop("means")], 1)
    return out


def standardise(train, val):
    """Columns scaled by the train split's std and centred on its mean (dense: n x p with p in the thousands)."""
    t = train.toarray() if sparse.issparse(train) else np.asarray(train)
    v = val.toarray() if sparse.issparse(val) else np.asarray(val)
    mean, std = t.mean(0), t.std(0)
    std[std == 0] = 1.0
    return (t - mean) / std, (v - mean) / std


def probe(x_train: np.ndarray, z_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Val predictions [S_val, D] of every target z (a column per descriptor / pair) by ridge regression fitted on
    train, each target's penalty picked by efficient leave-one-out on train; and each target's leave-one-out score
    (negative MSE) on train. Missing train targets: the mean."""
    xt, xv = standardise(x_train, x_val)
    z = np.where(np.isfinite(z_train), z_train, np.nanmean(z_train, 0))
    model = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(xt, z)
    return model.predict(xv), np.asarray(model.best_score_)


def given_probe(train: dict[str, np.ndarray], z_train: np.ndarray, val: dict[str, np.ndarray]) -> np.ndarray:
    """What the LLM is given, read linearly: per target, the best on train (leave-one-out) of the probes on the
    codes, the codes' FC, the connectivity tokens, and all three with each block scaled to the same total
    variance (one shared penalty over 17k code counts would otherwise drown the 100-odd connectivity columns)."""
    blocks = GIVEN_BLOCKS

    def balanced(views: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([views[b] / np.sqrt(max(1, ref[b].shape[1])) for b in blocks], 1)

    candidates = [probe(train[b], z_train, val[b]) for b in blocks]
    candidates.append(probe(balanced(train, train), z_train, balanced(val, train)))
    preds = np.stack([c[0] for c in candidates])            # [C, S_val, D]
    best = np.argmax(np.stack([c[1] for c in candidates]), 0)  # [D]
    return preds[best, :, np.arange(preds.shape[2])].T


def written_claims(desc_z: np.ndarray, pair_z: np.ndarray, cfg: CaptionConfig) -> dict[str, str]:
    """The claims a caption written from these z-values makes (the corpus's own writer and reader, so a probe's
    claim means exactly what a caption's does)."""
    text = caption_for(dict(zip(DESCRIPTOR_NAMES, desc_z)), dict(zip(PAIR_NAMES, pair_z)), {}, cfg, seed=0)
    return dict(caption_claims(text))


def paired_interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, draws: int = 4000) -> tuple[float, float]:
    """95 % bootstrap interval of mean(a) - mean(b) over paired scans."""
    idx = rng.integers(0, len(a), (draws, len(a)))
    diff = a[idx].mean(1) - b[idx].mean(1)
    return float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("runs/llm-quality/corpus"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/llm-quality/tokenizer/tokenizer"))
    parser.add_argument("--bins", type=int, default=4, help="connectivity levels (align.connectivity_bins)")
    parser.add_argument("--out", type=Path, default=Path("runs/llm-quality/recoverable.json"))
    parser.add_argument("--heldout", default="val", help="split(s) the probes are scored on, comma-separated "
                        "(val: what stage 2 validates on; val,test: twice the scans, tighter intervals)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.process_time()
    brain_tokenizer = load_brain_tokenizer(args.tokenizer)
    connectivity = fit_on_corpus(args.corpus, args.bins)
    # the codebook's principal axes: its rows span at most code_dim directions of the LLM's space
    book = brain_tokenizer.codebook.float()
    _, sv, vh = torch.linalg.svd(book - book.mean(0), full_matrices=False)
    basis = vh[sv > sv[0] * 1e-4].T
    keys = {"train": split_keys(args.corpus, "train"),
            "val": [k for s in args.heldout.split(",") for k in split_keys(args.corpus, s.strip())]}
    views = {s: scan_views(keys[s], args.corpus, brain_tokenizer, connectivity, basis) for s in keys}
    zarr = open_zarr(args.corpus)
    targets = {s: np.stack([np.concatenate([zarr.descriptors(k, z=True), zarr.fc_pairs(k, z=True)])
                            for k in keys[s]]) for s in keys}
    splits = ["train", *(s.strip() for s in args.heldout.split(","))]
    captions = {k: v for s in splits for k, v in read_captions(args.corpus, s).items()}
    truth = {s: [dict(caption_claims(captions[k])) for k in keys[s]] for s in keys}
    cfg = CaptionConfig()
    n_desc = len(DESCRIPTOR_NAMES)

    def claims_of(z: np.ndarray) -> list[dict[str, str]]:
        return [written_claims(row[:n_desc], row[n_desc:], cfg) for row in z]

    # the writer's check: claims written from the true z must be the captions' (else CaptionConfig differs)
    oracle = claims_of(targets["val"])
    agree = np.mean([o == t for o, t in zip(oracle, truth["val"])])
    said = {view: claims_of(probe(views["train"][view], targets["train"], views["val"][view])[0])
            for view in VIEWS if view != "given"}
    said["given"] = claims_of(given_probe(views["train"], targets["train"], views["val"]))
    rng = np.random.default_rng(args.seed)

    rows = {}
    names = sorted({n for t in truth["val"] for n in t if not n.startswith("?")})
    for name in names:
        train_values = [t[name] for t in truth["train"] if name in t]
        majority = Counter(train_values).most_common(1)[0][0]
        va = [i for i, t in enumerate(truth["val"]) if name in t]
        true = [truth["val"][i][name] for i in va]
        base = np.array([v == majority for v in true], float)
        row = {"values": len(set(train_values)), "val_scans": len(va), "majority_value": majority,
               "majority": float(base.mean())}
        for view in VIEWS:
            hit = np.array([said[view][i].get(name) == v for i, v in zip(va, true)], float)
            row[view] = float(hit.mean())
            if view == "given":
                low, high = paired_interval(hit, base, rng)
                row["given_minus_majority_ci"] = [low, high]
                row["recoverable"] = bool(low > 0)
        rows[name] = row

    recoverable = sorted(n for n, r in rows.items() if r["recoverable"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "corpus": str(args.corpus), "tokenizer": str(args.tokenizer), "connectivity_bins": args.bins,
        "heldout": args.heldout, "heldout_scans": len(keys["val"]),
        "rule": "lower end of the 95% paired bootstrap interval (val scans) of given-probe minus majority "
                "accuracy > 0", "recoverable": recoverable, "claims": rows}, indent=2))

    print(f"{'claim':28s} {'vals':>4s} {'major':>6s}" + "".join(f" {v[:8]:>8s}" for v in VIEWS)
          + "  given-major 95% CI  recoverable")
    for name, r in rows.items():
        lo, hi = r["given_minus_majority_ci"]
        print(f"{name:28s} {r['values']:4d} {r['majority']:6.3f}" + "".join(f" {r[v]:8.3f}" for v in VIEWS)
              + f"  [{lo:+.3f}, {hi:+.3f}]  {'yes' if r['recoverable'] else ''}")
    print(f"\n{len(recoverable)} of {len(rows)} claims recoverable from codes + connectivity tokens "
          f"({len(keys['train'])} train / {len(keys['val'])} {args.heldout} scans); "
          "fc, spectrum: of the series, not given to the LLM")
    print(f"claims written from the true z = the captions' claims on {agree:.0%} of {args.heldout} scans")
    print(f"wrote {args.out}; {time.process_time() - start:.0f} CPU s")


if __name__ == "__main__":
    main()
