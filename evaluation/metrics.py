"""The figures of a task, their 95 % intervals over test subjects, and the model-minus-FC differences (docs/design.md).

Each figure comes from ONE kind of prediction per scan:

- classification: the LOG-ODDS of class 1 (the LLM: the log-likelihood difference of the two options; a logistic
  baseline: its decision function). Class 1 is predicted where log-odds > 0; the AUC ranks the log-odds themselves
  (a probability would saturate to 0 / 1 and turn distinct scores into ties); the ECE is that of sigmoid(log-odds)
  over 10 uniform bins (the bins of scikit-learn's `calibration_curve(strategy='uniform')`).
- regression: the predicted values, every one finite: the caller replaces a miss (an answer that does not parse) by
  its declared fallback before calling, and reports `misses` / `miss_rate` itself.

Uncertainty: a percentile bootstrap over TEST SUBJECTS (`scipy.stats.bootstrap`, 1000 resamples, seeded). A subject
may have several scans: what is resampled is the array of subject indices, and the statistic gathers every scan of
each drawn subject, so a subject's scans move together and a cohort scanned twice is not counted as twice the
evidence. Percentile rather than BCa: BCa's acceleration needs a jackknife over subjects, and it is undefined (NaN)
when every resample gives the same figure, which is exactly the perfect classifier (its AUC interval must read
[1, 1]).

Resamples where a figure is undefined are handled, never left as a silent NaN:
- classification resamples subjects WITHIN their class stratum (a subject is in stratum 1 if any of its scans is
  class 1): every resample holds both classes, so AUC and balanced accuracy are always defined. A stratum of a
  single subject cannot vary and is kept as it is in every resample.
- a figure still undefined in some resamples (Pearson r of a resample whose predictions are all equal) gets its
  interval from the resamples where it is defined, and the count of the others is returned
  (`interval_details`; `add_intervals` records it as `ci_undefined`); defined in fewer than half of them, or undefined
  on the test split itself, it gets no interval (None).
- fewer than two subjects in every stratum: nothing can be resampled, and no figure gets an interval (None).

Paired differences (model minus FC baseline) resample the SAME subjects for both predictions: one statistic
computes both figures on one gathered resample, so what varies is the difference, not two independent draws.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.special import expit

from fmrilm_core.bootstrap import CONFIDENCE, METHOD, N_RESAMPLES, Subjects, bootstrap, group_subjects, interval

CLASSIFICATION = ("accuracy", "balanced_accuracy", "auc", "f1", "ece")
REGRESSION = ("mae", "r", "r2")
HEADLINE = {"classification": "auc", "regression": "mae"}
SECONDARY = {"classification": "balanced_accuracy", "regression": "r"}
COMPARED = {"classification": ("auc", "balanced_accuracy", "accuracy"), "regression": ("mae", "r", "r2")}
LOWER_IS_BETTER = ("mae", "ece")
FC = "fc_baseline"
BASELINES = ("fc_baseline", "tokenizer_probe")
NOT_PROTOCOLS = ("bootstrap", "regularisation", "temperature", "fallback")  # dict-valued entry keys, no figures


def figure_names(kind: str) -> tuple[str, ...]:
    return CLASSIFICATION if kind == "classification" else REGRESSION


def protocols(entry: dict) -> list[str]:
    """The names of a metrics.json task entry that hold figures (protocols and baselines), in the entry's order."""
    return [k for k, v in entry.items() if isinstance(v, dict) and k not in NOT_PROTOCOLS]


# ---- calibration --------------------------------------------------------------------------------------------

def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Uniform-bin reliability of the class-1 probability `p` against binary `y`: per non-empty bin the fraction of
    positives, the mean probability and the count. Edges linspace(0, 1, n_bins + 1); a value on an inner edge goes
    to the lower bin, as in scikit-learn's `calibration_curve(strategy='uniform')`."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    which = np.searchsorted(inner, p, side="left")
    count = np.bincount(which, minlength=n_bins)
    keep = count > 0
    true = np.bincount(which, weights=y, minlength=n_bins)[keep] / count[keep]
    pred = np.bincount(which, weights=p, minlength=n_bins)[keep] / count[keep]
    return {"prob_true": true, "prob_pred": pred, "count": count[keep]}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Sum over the bins of `reliability` of (bin count / n) * |fraction of positives - mean probability|."""
    r = reliability(y, p, n_bins)
    return float(np.sum(r["count"] * np.abs(r["prob_true"] - r["prob_pred"])) / max(1, int(r["count"].sum())))


def fit_temperature(logodds_val: np.ndarray, y_val: np.ndarray) -> float:
    """Temperature scaling: the T > 0 minimising the negative log-likelihood of sigmoid(logodds / T) on the val
    split. Searched over log T in [-6, 6] (bounded: on a perfectly separated val split the NLL keeps falling as
    T -> 0, and the bound stops it at exp(-6)). All log-odds 0: nothing to scale, T = 1."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logodds_val, float), np.asarray(y_val, float)
    if not np.any(z):
        return 1.0

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.sum(np.logaddexp(0.0, s) - y * s))  # -log sigmoid(s) for y=1, -log(1-sigmoid(s)) for y=0

    return float(np.exp(minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded",
                                        options={"xatol": 1e-6}).x))


# ---- the figures --------------------------------------------------------------------------------------------

def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half): P(score of a class-1 scan > score of a class-0 scan)."""
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # average ranks: a tie contributes 1/2
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _classification_values(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """[accuracy, balanced accuracy, AUC, F1, ECE] (CLASSIFICATION order) of binary y and log-odds s. Balanced
    accuracy and AUC are undefined (NaN) when one class is absent; F1 is 0 when class 1 is never predicted nor true."""
    pred = s > 0
    pos = y == 1
    tp, fn = int(np.sum(pred & pos)), int(np.sum(~pred & pos))
    fp, tn = int(np.sum(pred & ~pos)), int(np.sum(~pred & ~pos))
    n = len(y)
    balanced = 0.5 * (tp / (tp + fn) + tn / (tn + fp)) if (tp + fn) and (tn + fp) else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return np.array([(tp + tn) / n, balanced, _auc(pos.astype(int), s), f1, expected_calibration_error(y, expit(s))])


def _regression_values(y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[MAE, Pearson r, R^2] (REGRESSION order); r undefined (NaN) when either side is constant, R^2 when y is."""
    err = v - y
    yc, vc = y - y.mean(), v - v.mean()
    ss_y, ss_v = float(yc @ yc), float(vc @ vc)
    r = float(yc @ vc / np.sqrt(ss_y * ss_v)) if ss_y > 0 and ss_v > 0 else float("nan")
    r2 = 1.0 - float(err @ err) / ss_y if ss_y > 0 else float("nan")
    return np.array([float(np.mean(np.abs(err))), r, r2])


def _checked(kind: str, y, pred) -> tuple[np.ndarray, np.ndarray]:
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if y.shape != pred.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels {y.shape} and predictions {pred.shape} must be two equal non-empty 1-D arrays")
    if not np.all(np.isfinite(pred)):
        raise ValueError(f"{kind} predictions must all be finite ({int(np.sum(~np.isfinite(pred)))} are not): "
                         "replace a miss by the declared fallback first")
    if kind == "classification":
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("classification labels must be 0 or 1")
        return y.astype(int), pred
    return y, pred


def _values(kind: str, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _classification_values(y, pred) if kind == "classification" else _regression_values(y, pred)


def classification_figures(y, logodds) -> dict[str, float]:
    """{"n", "accuracy", "balanced_accuracy", "auc", "f1", "ece"} of binary labels and log-odds of class 1."""
    y, s = _checked("classification", y, logodds)
    return {"n": float(len(y))} | {k: float(v) for k, v in zip(CLASSIFICATION, _classification_values(y, s))}


def regression_figures(y, values) -> dict[str, float]:
    """{"n", "mae", "r", "r2"} of true and predicted values (all finite: misses already replaced by the caller)."""
    y, v = _checked("regression", y, values)
    return {"n": float(len(y))} | {k: float(x) for k, x in zip(REGRESSION, _regression_values(y, v))}


# ---- the bootstrap over subjects (fmrilm_core.bootstrap) ---------------------------------------------------

def _subjects(kind: str, y: np.ndarray, groups) -> Subjects:
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups {groups.shape} must give the subject of each of the {len(y)} scans")
    return group_subjects(groups, y if kind == "classification" else None)


def _bootstrap(kind: str, y: np.ndarray, statistic, groups, seed: int, n_resamples: int):
    return bootstrap(statistic, _subjects(kind, y, groups), seed, n_resamples)


def interval_details(kind: str, y, pred, groups, seed: int = 0,
                     n_resamples: int = N_RESAMPLES) -> tuple[dict[str, list[float] | None], dict[str, int]]:
    """(`intervals`, {figure: resamples where it was undefined} for the figures with any)."""
    y, pred = _checked(kind, y, pred)
    names = figure_names(kind)
    result = _bootstrap(kind, y, lambda i: _values(kind, y[i], pred[i]), groups, seed, n_resamples)
    point = _values(kind, y, pred)
    ci, undefined = {}, {}
    for j, name in enumerate(names):
        ci[name], missing = interval(result, j, point[j])
        if missing:
            undefined[name] = missing
    return ci, undefined


def intervals(kind: str, y, pred, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict:
    """{figure: [lo, hi]} 95 % percentile bootstrap intervals over the subjects `groups` (one id per scan) of every
    figure of `kind` (classification: accuracy, balanced_accuracy, auc, f1, ece; regression: mae, r, r2); None for a
    figure without one (see the module doc)."""
    return interval_details(kind, y, pred, groups, seed, n_resamples)[0]


def paired_difference(kind: str, y, pred_model, pred_baseline, groups, seed: int = 0,
                      n_resamples: int = N_RESAMPLES) -> dict[str, dict]:
    """{figure: {"diff": model - baseline, "ci": [lo, hi] or None}} for the compared figures of `kind`
    (classification: auc, balanced_accuracy, accuracy; regression: mae, r, r2), the interval from the same resampled
    subjects for both predictions."""
    y, model = _checked(kind, y, pred_model)
    _, baseline = _checked(kind, y, pred_baseline)
    names = figure_names(kind)
    pick = [names.index(m) for m in COMPARED[kind]]

    def diff(i: np.ndarray) -> np.ndarray:
        return _values(kind, y[i], model[i])[pick] - _values(kind, y[i], baseline[i])[pick]

    result = _bootstrap(kind, y, diff, groups, seed, n_resamples)
    point = diff(np.arange(len(y)))
    return {m: {"diff": float(point[j]), "ci": interval(result, j, point[j])[0]}
            for j, m in enumerate(COMPARED[kind])}


def roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the ROC curve of log-odds `s`, from (0, 0), one point per
    distinct score (scikit-learn's `roc_curve` without dropping collinear points; computed here because the band
    calls it once per resample)."""
    y = np.asarray(y, int)
    order = np.argsort(-np.asarray(s, float), kind="stable")
    s_sorted, hit = np.asarray(s, float)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # the last scan of each distinct score
    tp, fp = np.cumsum(hit)[last], np.cumsum(1 - hit)[last]
    return np.r_[0.0, fp / max(1, fp[-1])], np.r_[0.0, tp / max(1, tp[-1])]


def roc_band(y, logodds, groups, seed: int = 0, n_resamples: int = N_RESAMPLES,
             fpr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr grid, lower, upper): per false-positive rate of the grid (default 101 points on [0, 1]) the 95 %
    percentile band of the true-positive rate over the same subject resamples as `intervals`."""
    y, s = _checked("classification", y, logodds)
    grid = np.linspace(0.0, 1.0, 101) if fpr is None else np.asarray(fpr, float)

    def tpr(i: np.ndarray) -> np.ndarray:
        f, t = roc_points(y[i], s[i])
        return np.interp(grid, f, t)

    result = _bootstrap("classification", y, tpr, groups, seed, n_resamples)
    if result is None:
        return grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    return grid, np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def add_intervals(entry: dict, y, predictions: dict, groups, seed: int = 0,
                  n_resamples: int = N_RESAMPLES) -> dict:
    """Add to one metrics.json task entry, for every name of `predictions` (protocols and baselines: test-scan
    log-odds or values, in the order of `y`): `entry[name]["ci"]` ({figure: [lo, hi] or None}), `["ci_undefined"]`
    (resamples where a figure was undefined, only when there are some), and, for every name but fc_baseline itself
    when fc_baseline is among them, `["vs_fc_baseline"]` ({figure: {"diff", "ci"}}); and `entry["bootstrap"]`, how
    the intervals were drawn. Returns the entry (changed in place)."""
    kind = entry["kind"]
    y = np.asarray(y, float)
    for name, pred in predictions.items():
        figures = entry.setdefault(name, {})
        figures["ci"], undefined = interval_details(kind, y, pred, groups, seed, n_resamples)
        if undefined:
            figures["ci_undefined"] = undefined
        else:
            figures.pop("ci_undefined", None)
        if name != FC and FC in predictions:
            figures["vs_fc_baseline"] = paired_difference(kind, y, pred, predictions[FC], groups, seed, n_resamples)
    sub = _subjects(kind, y, groups)
    entry["bootstrap"] = {"unit": "subject", "subjects": int(len(sub.counts)), "resamples": int(n_resamples),
                          "method": METHOD, "confidence": CONFIDENCE, "seed": int(seed),
                          "stratified_by_class": kind == "classification"}
    return entry
