"""What can a model that reads a scan through the stage-1 tokenizer know about the paper's tasks? A bound, no LLM.

    .venv/bin/python bench/stage3_ceiling.py [--corpus runs/llm-quality/corpus]
                                             [--tokenizer runs/llm-quality/tokenizer/tokenizer ...]

Stage 3 in `tokens` mode sees a scan only as its W x N codes (stage 2's `features` mode as the continuous features
before quantisation). On the test split of the corpus, with the same linear models and the same train-split CV as
`fmrilm eval`'s baselines (`evaluation.baselines.fit_predict`), this scores, per task:

  fc_baseline        Fisher-z FC of the ROI series (what `fmrilm eval` reports beside the model)
  connectivity_tokens  stage 2/3's connectivity tokens (`llm_train.connectivity`, levels fitted on the train split),
                     one-hot: what the tokens after the codes carry; `--bins` levels
  features_probe     mean and std of the stage-1 features over a scan's tokens (`fmrilm eval`'s tokenizer_probe)
  codes_probe        the per-ROI histogram of a scan's codes (N x K counts): what the discrete tokens carry, read
                     by a linear model that sees which code each ROI took how often
  codes_fc_probe     Fisher-z "FC" of the code sequences: per ROI the W codes' embedding rows (the codebook),
                     correlated between ROIs over the W steps, the closest a token reader gets to FC

The issue's bar is the tuned model's AUC >= the FC baseline's - 0.05. A linear probe is not a ceiling for an LLM in
principle, but when every reading of the codes stays far below FC, the tokens have lost what FC holds, and no stage-3
setting recovers it. Several tokenizers (e.g. the shipped one and the `tokenizer.loss.domain: 0` one) side by side.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch

from corpus_builder.readers import open_zarr, read_phenotypes
from evaluation.baselines import fc_features, fit_predict, probe_features
from evaluation.metrics import classification_figures, regression_figures
from evaluation.tasks import select_tasks
from llm_train.connectivity import fit_on_corpus
from llm_train.train import load_brain_tokenizer


def code_features(brain_tokenizer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-ROI code histograms [B, N*K], Fisher-z correlations of the codebook rows between ROIs [B, N(N-1)/2])."""
    hist, corr = [], []
    book = brain_tokenizer.codebook.float().cpu()  # [K, llm_dim]: the rows stage 2 starts its brain tokens from
    for i in range(0, len(x), 32):
        codes = brain_tokenizer.encode(torch.as_tensor(x[i:i + 32], dtype=torch.float32)).cpu()  # [b, W, N]
        k = brain_tokenizer.config.codebook_size
        one_hot = torch.nn.functional.one_hot(codes, k).sum(1).float()  # [b, N, K]
        hist.append(one_hot.flatten(1).numpy())
        rows = book[codes]  # [b, W, N, d]
        series = rows.permute(0, 2, 1, 3).flatten(2)  # [b, N, W*d]: each ROI's code rows in time order
        corr.append(fc_features(series.permute(0, 2, 1).double().numpy()))
    return np.concatenate(hist), np.concatenate(corr)


def headline(f: np.ndarray, *, train_rows, test_rows, y_train, y_test, groups, classification: bool,
             seed: int) -> float:
    """Test AUC (classification) or MAE (regression) of `fmrilm eval`'s linear baseline model on the features `f`
    (one row per scan) of the train and test rows."""
    pred, _ = fit_predict(f[train_rows], y_train, groups, f[test_rows], classification, seed)
    if classification:
        return classification_figures(y_test, pred)["auc"]  # pred: the baseline's log-odds
    return regression_figures(y_test, [float(v) for v in pred])["mae"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("runs/llm-quality/corpus"))
    parser.add_argument("--tokenizer", type=Path, nargs="+",
                        default=[Path("runs/llm-quality/tokenizer/tokenizer"),
                                 Path("runs/llm-quality/tokenizer-domain0/tokenizer")])
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=int, default=4, help="levels of the connectivity tokens")
    args = parser.parse_args()

    train_pheno, test_pheno = read_phenotypes(args.corpus, "train"), read_phenotypes(args.corpus, "test")
    runnable, skipped = select_tasks(args.tasks, train_pheno, test_pheno)
    zarr = open_zarr(args.corpus)
    keys = sorted(set(train_pheno.index) | set(test_pheno.index))
    x = {k: np.asarray(v, np.float32) for k, v in zip(keys, zarr.batch(keys))}
    print(f"corpus {args.corpus}: {len(train_pheno)} train / {len(test_pheno)} test scans; "
          f"X {next(iter(x.values())).shape}; skipped: {skipped or 'none'}")
    # every reading of every scan once (each is per scan), then indexed per task
    xs = np.stack([x[k] for k in keys])
    row = {k: i for i, k in enumerate(keys)}
    fc = fc_features(xs)
    spec = fit_on_corpus(args.corpus, args.bins)
    levels = spec.levels(torch.from_numpy(xs)).numpy()  # [S, P]
    conn = np.zeros((len(xs), spec.size))
    conn[np.arange(len(xs))[:, None], np.arange(spec.n_tokens) * spec.bins + levels] = 1
    readings = {}
    for p in args.tokenizer:
        if (p / "config.json").is_file():
            bt = load_brain_tokenizer(p)
            hist, code_fc = code_features(bt, xs)
            readings[str(p)] = {"features_probe": probe_features(bt, xs), "codes_probe": hist,
                                "codes_fc_probe": code_fc}
    for data in runnable:
        task, classification = data.task, data.task.kind == "classification"
        train_keys, test_keys = sorted(data.train.index), sorted(data.test.index)
        groups = train_pheno.loc[train_keys, "subject"].astype(str).to_numpy()
        y_train, y_test = data.train[train_keys].to_numpy(), data.test[test_keys].to_numpy()
        score = functools.partial(headline, train_rows=[row[k] for k in train_keys],
                                  test_rows=[row[k] for k in test_keys], y_train=y_train, y_test=y_test,
                                  groups=groups, classification=classification, seed=args.seed)

        metric = "AUC" if classification else "MAE"
        print(f"\n{task.name} ({metric}, {len(train_keys)} train / {len(test_keys)} test scans)")
        print(f"  {'fc_baseline':<21}{score(fc):>8.3f}")
        print(f"  {'connectivity_tokens':<21}{score(conn):>8.3f}  ({spec.n_tokens} tokens, {spec.bins} levels)")
        for name, features in readings.items():
            print(f"  {name}")
            for label, f in features.items():
                print(f"    {label:<14}{score(f):>8.3f}")

if __name__ == "__main__":
    main()
