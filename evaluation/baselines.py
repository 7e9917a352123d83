"""The baselines every model figure is printed beside, on the same scans, subjects and splits.

- `fc_baseline`: the connectome baseline labs trust. Per scan the Pearson correlation of its ROI series (the corpus's
  X [T, N], read through the zarr reader), Fisher z (arctanh, clipped off +-1), upper triangle -> N(N-1)/2
  features; standardised, then logistic regression (classification) or ridge regression (regression).
- `tokenizer_probe`: a linear probe on the frozen stage-1 features: the brain tokenizer's continuous features in the
  LLM's space (`to_llm(z)`, [W, N, d]) pooled per scan (mean and standard deviation over its W x N tokens -> 2d),
  then the same linear models.

The regularisation (C, alpha) is chosen by cross-validation inside the training split only (folds grouped by
subject, stratified for a classification: no subject on both sides of a fold); the chosen model is refitted on the
whole training split and scored once on the test split.
"""

from __future__ import annotations

import numpy as np
import torch

C_GRID = np.logspace(-3, 2, 6)
ALPHA_GRID = np.logspace(-2, 4, 7)


def fc_features(x: np.ndarray) -> np.ndarray:
    """[B, T, N] ROI series -> [B, N(N-1)/2] Fisher-z correlations (upper triangle, row-major)."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm > 0, norm, 1.0)
    corr = np.einsum("btn,btm->bnm", x, x)
    rows, cols = np.triu_indices(x.shape[2], k=1)
    return np.arctanh(np.clip(corr[:, rows, cols], -0.999999, 0.999999))


@torch.no_grad()
def probe_features(brain_tokenizer, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """[B, T, N] -> [B, 2d]: mean and std over the W x N tokens of the tokenizer's features in the LLM's space."""
    from llm_train.data import encode_scans

    out = []
    for i in range(0, len(x), batch_size):
        feats = encode_scans(brain_tokenizer, torch.as_tensor(np.asarray(x[i:i + batch_size]), dtype=torch.float32),
                             True)["features"]
        flat = feats.flatten(1, 2).double()
        out.append(torch.cat([flat.mean(1), flat.std(1)], dim=1).numpy())
    return np.concatenate(out)


def _folds(y: np.ndarray, groups: np.ndarray, classification: bool) -> int:
    n_groups = len(np.unique(groups))
    if classification:
        per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
        return int(min(5, per_class, n_groups))
    return int(min(5, n_groups))


def fit_predict(features_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, features_test: np.ndarray,
                classification: bool, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Test-split predictions (log-odds of class 1, or values) of the linear model whose regularisation was chosen
    by grouped CV on the training split; and what was chosen ({'param', 'value', 'folds'})."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if classification:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        param, grid, scoring = "logisticregression__C", C_GRID, "roc_auc"
    else:
        model = make_pipeline(StandardScaler(), Ridge())
        param, grid, scoring = "ridge__alpha", ALPHA_GRID, "neg_mean_absolute_error"
    folds = _folds(y_train, groups, classification)
    if folds >= 2:
        cv = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if classification else GroupKFold(folds))
        search = GridSearchCV(model, {param: grid}, cv=cv, scoring=scoring)
        search.fit(features_train, y_train, groups=groups)
        fitted, chosen = search.best_estimator_, float(search.best_params_[param])
    else:  # too few subjects to cross-validate: the middle of the grid
        chosen = float(grid[len(grid) // 2])
        fitted = model.set_params(**{param: chosen}).fit(features_train, y_train)
    # a classification's prediction is its log-odds of class 1 (the LLM's figures come from log-odds too)
    pred = fitted.decision_function(features_test) if classification else fitted.predict(features_test)
    return pred, {"param": param.split("__")[1], "value": chosen, "folds": folds}
