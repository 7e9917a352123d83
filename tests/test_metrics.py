"""The figures of `fmrilm eval` and their uncertainty (`evaluation.metrics`): the point figures against
scikit-learn / scipy on fixed data, the subject-level bootstrap intervals (they hold the point, narrow with more
subjects, move a subject's scans together, never come out NaN), paired model-minus-FC differences, temperature
scaling, and the intervals `add_intervals` writes into a metrics.json entry. Synthetic data only; no model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from evaluation import metrics as M
from fmrilm_core.bootstrap import paired_mean_difference


def _classification(n_subjects: int, seed: int, scans: int = 1, signal: float = 1.0):
    """Labels, log-odds and subject ids: `scans` scans per subject, a subject's label shared by its scans."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n_subjects)
    groups = np.repeat(np.arange(n_subjects), scans)
    y = label[groups]
    return y, signal * (2 * y - 1) + rng.normal(size=y.size), groups


def _regression(n_subjects: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.uniform(40, 80, n_subjects)
    return y, y + rng.normal(0, 8, n_subjects), np.arange(n_subjects)


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


# ---- point figures --------------------------------------------------------------------------------------------

def test_figures_equal_scikit_learn_and_scipy_on_fixed_data():
    from scipy.stats import pearsonr
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        mean_absolute_error,
        r2_score,
        roc_auc_score,
    )

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(1.5 * (2 * y - 1) + rng.normal(0, 2, 200), 1)  # rounded: ties in the scores, and exact zeros
    assert np.any(s == 0) and len(np.unique(s)) < len(s)
    fig = M.classification_figures(y, s)
    pred = (s > 0).astype(int)
    assert fig["n"] == 200
    assert fig["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert fig["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert fig["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert fig["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    true, mean_p = calibration_curve(y, expit(s), n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], expit(s)), minlength=10)
    assert fig["ece"] == pytest.approx(float(np.sum(counts[counts > 0] * np.abs(true - mean_p)) / 200), abs=1e-12)

    t = rng.uniform(20, 80, 150)
    v = t + rng.normal(0, 10, 150)
    reg = M.regression_figures(t, v)
    assert reg["n"] == 150
    assert reg["mae"] == pytest.approx(mean_absolute_error(t, v), abs=1e-12)
    assert reg["r"] == pytest.approx(pearsonr(t, v)[0], abs=1e-12)
    assert reg["r2"] == pytest.approx(r2_score(t, v), abs=1e-12)


def test_reliability_bins_are_scikit_learns_uniform_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=300), [0.0, 0.1, 0.2, 0.5, 0.9, 1.0]])  # values on the bin edges too
    y = (rng.uniform(size=p.size) < p ** 1.5).astype(int)
    for n_bins in (5, 10, 15):
        ours = M.reliability(y, p, n_bins)
        true, pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        np.testing.assert_allclose(ours["prob_true"], true, atol=1e-12)
        np.testing.assert_allclose(ours["prob_pred"], pred, atol=1e-12)
        assert ours["count"].sum() == p.size


def test_a_miss_must_be_replaced_before_the_figures():
    with pytest.raises(ValueError, match="fallback"):
        M.regression_figures([50.0, 60.0], [51.0, float("nan")])
    with pytest.raises(ValueError, match="0 or 1"):
        M.classification_figures([0, 2], [0.1, 0.2])


# ---- intervals ------------------------------------------------------------------------------------------------

def test_intervals_hold_the_point_and_narrow_with_more_subjects():
    widths = {}
    for n in (40, 400):
        y, s, g = _classification(n, seed=n)
        ci, point = M.intervals("classification", y, s, g), M.classification_figures(y, s)
        t, v, gr = _regression(n, seed=n)
        ci_r, point_r = M.intervals("regression", t, v, gr), M.regression_figures(t, v)
        for c, p in ((ci, point), (ci_r, point_r)):
            for name, (lo, hi) in c.items():
                assert lo <= p[name] <= hi, (n, name, lo, p[name], hi)
        widths[n] = {m: _width(c[m]) for c, m in ((ci, "auc"), (ci, "balanced_accuracy"), (ci_r, "mae"),
                                                   (ci_r, "r"))}
    for m in widths[40]:  # 10x the subjects: about 1/sqrt(10) = 0.32 of the width
        assert widths[400][m] < 0.55 * widths[40][m], (m, widths)


def test_a_perfect_classifier_has_auc_interval_one_one():
    y, _, g = _classification(30, seed=1)
    ci = M.intervals("classification", y, np.where(y == 1, 2.0, -2.0) + 0.01 * g, g, n_resamples=300)
    assert ci["auc"] == [1.0, 1.0] and ci["balanced_accuracy"] == [1.0, 1.0] and ci["accuracy"] == [1.0, 1.0]


def test_the_scans_of_one_subject_move_together():
    """Each subject scanned 4 times with the same figures: resampling subjects gives exactly the interval of one
    scan per subject (no extra evidence); resampling scans would wrongly narrow it (about 1/2)."""
    y, s, g = _classification(60, seed=2)
    t, v, _ = _regression(60, seed=2)
    k = 4
    yk, sk, tk, vk, gk = (np.repeat(a, k) for a in (y, s, t, v, g))
    for kind, (a, b), (ak, bk) in (("classification", (y, s), (yk, sk)), ("regression", (t, v), (tk, vk))):
        once = M.intervals(kind, a, b, g, n_resamples=400)
        by_subject = M.intervals(kind, ak, bk, gk, n_resamples=400)
        by_scan = M.intervals(kind, ak, bk, np.arange(len(ak)), n_resamples=400)
        for name in once:
            np.testing.assert_allclose(by_subject[name], once[name], atol=1e-12, err_msg=name)
        headline = M.HEADLINE[kind]
        assert _width(by_scan[headline]) < 0.7 * _width(once[headline])


def test_a_rare_class_never_gives_a_nan_or_missing_auc_interval():
    """2 class-1 subjects out of 42: a plain resample would miss class 1 about one time in eight; resampling within
    the class strata always holds both, and a class of one subject is kept in every resample."""
    rng = np.random.default_rng(4)
    for positives in (2, 1):
        y = np.r_[np.ones(positives, int), np.zeros(40, int)]
        s = (2 * y - 1) * 0.5 + rng.normal(size=y.size)
        ci, undefined = M.interval_details("classification", y, s, np.arange(y.size), n_resamples=500)
        assert undefined == {}
        for name, (lo, hi) in ci.items():
            assert np.isfinite(lo) and np.isfinite(hi) and lo <= M.classification_figures(y, s)[name] <= hi


def test_resamples_where_a_figure_is_undefined_are_counted_not_hidden():
    """r of predictions that vary in one subject only: undefined in every resample without that subject (about
    (1 - 1/n)^n = 37 %): the interval comes from the others and the count is returned; r of constant predictions
    is undefined: no interval, every resample counted."""
    t, _, g = _regression(50, seed=5)
    v = np.full(50, 60.0)
    v[0] = 90.0
    ci, undefined = M.interval_details("regression", t, v, g, n_resamples=1000)
    assert 250 < undefined["r"] < 500 and np.all(np.isfinite(ci["r"]))
    assert "mae" not in undefined and np.all(np.isfinite(ci["mae"]))
    ci, undefined = M.interval_details("regression", t, np.full(50, 60.0), g, n_resamples=200)
    assert ci["r"] is None and undefined["r"] == 200 and np.all(np.isfinite(ci["mae"]))


def test_intervals_are_seeded():
    y, s, g = _classification(50, seed=6)
    assert M.intervals("classification", y, s, g, seed=3, n_resamples=200) == \
        M.intervals("classification", y, s, g, seed=3, n_resamples=200)
    assert M.intervals("classification", y, s, g, seed=3, n_resamples=200) != \
        M.intervals("classification", y, s, g, seed=4, n_resamples=200)


# ---- paired differences ---------------------------------------------------------------------------------------

def test_a_model_against_itself_differs_by_exactly_zero():
    y, s, g = _classification(50, seed=7, scans=2)
    t, v, gr = _regression(50, seed=7)
    for kind, a, b, groups in (("classification", y, s, g), ("regression", t, v, gr)):
        for name, d in M.paired_difference(kind, a, b, b.copy(), groups, n_resamples=300).items():
            assert d == {"diff": 0.0, "ci": [0.0, 0.0]}, (kind, name)


def test_a_clearly_better_model_excludes_zero_and_pairing_narrows_the_interval():
    rng = np.random.default_rng(8)
    y, good, g = _classification(120, seed=8, signal=2.0)
    weak = 0.3 * (2 * y - 1) + rng.normal(size=y.size)
    d = M.paired_difference("classification", y, good, weak, g)
    assert d["auc"]["diff"] > 0 and d["auc"]["ci"][0] > 0 and d["balanced_accuracy"]["ci"][0] > 0
    t, v, gr = _regression(120, seed=8)
    d = M.paired_difference("regression", t, v, t + rng.normal(0, 20, 120), gr)
    assert d["mae"]["diff"] < 0 and d["mae"]["ci"][1] < 0 and d["r"]["ci"][0] > 0
    # nearly the same model: the same subjects for both make the difference far tighter than either figure
    close = good + rng.normal(0, 0.05, y.size)
    paired = M.paired_difference("classification", y, close, good, g)["auc"]["ci"]
    alone = M.intervals("classification", y, good, g)["auc"]
    assert _width(paired) < 0.25 * _width(alone)


# ---- temperature scaling --------------------------------------------------------------------------------------

def test_fit_temperature_recovers_a_known_temperature_and_lowers_ece():
    rng = np.random.default_rng(9)

    def draw(n):
        z = rng.normal(0, 1.5, n)  # calibrated log-odds
        return (rng.uniform(size=n) < expit(z)).astype(int), 3.0 * z  # the model reports them 3x overconfident

    y_val, val = draw(20000)
    temperature = M.fit_temperature(val, y_val)
    assert temperature == pytest.approx(3.0, rel=0.08)
    y_test, test = draw(4000)
    before = M.classification_figures(y_test, test)["ece"]
    after = M.classification_figures(y_test, test / temperature)["ece"]
    assert after < 0.5 * before
    assert M.fit_temperature(np.zeros(10), np.r_[np.zeros(5), np.ones(5)]) == 1.0


# ---- a metrics.json entry -------------------------------------------------------------------------------------

def test_add_intervals_writes_every_interval_and_difference_into_the_entry():
    rng = np.random.default_rng(10)
    y, model, g = _classification(40, seed=10, scans=2)
    preds = {"zero_shot": model, "fc_baseline": model + rng.normal(0, 1, y.size),
             "tokenizer_probe": rng.normal(size=y.size)}
    entry = {"kind": "classification", "n_test": int(y.size)}
    entry.update({name: M.classification_figures(y, p) for name, p in preds.items()})
    entry["fc_baseline"]["regularisation"] = {"param": "C", "value": 1.0, "folds": 5}
    M.add_intervals(entry, y, preds, g, seed=0, n_resamples=300)
    assert M.protocols(entry) == ["zero_shot", "fc_baseline", "tokenizer_probe"]
    for name, p in preds.items():
        assert entry[name]["ci"] == M.intervals("classification", y, p, g, seed=0, n_resamples=300)
        assert set(entry[name]["ci"]) == set(M.CLASSIFICATION)
    assert "vs_fc_baseline" not in entry["fc_baseline"]
    for name in ("zero_shot", "tokenizer_probe"):
        diff = entry[name]["vs_fc_baseline"]
        assert set(diff) == {"auc", "balanced_accuracy", "accuracy"}
        assert diff["auc"]["diff"] == pytest.approx(entry[name]["auc"] - entry["fc_baseline"]["auc"], abs=1e-12)
    assert entry["bootstrap"] == {"unit": "subject", "subjects": 40, "resamples": 300, "method": "percentile",
                                  "confidence": 0.95, "seed": 0, "stratified_by_class": True}
    json.dumps(entry, allow_nan=False)  # no NaN reaches metrics.json


def test_roc_band_brackets_the_curve_of_the_test_split():
    y, s, g = _classification(80, seed=11)
    grid, lo, hi = M.roc_band(y, s, g, n_resamples=300)
    f, t = M.roc_points(y, s)
    curve = np.interp(grid, f, t)
    assert np.all(lo <= hi) and np.mean((lo <= curve + 1e-12) & (curve <= hi + 1e-12)) > 0.95
    assert lo[-1] == hi[-1] == 1.0 and np.all(hi - lo < 0.6)


def test_paired_mean_difference_resamples_subjects_not_scans():
    # two subjects of ten scans each: one whose figure beats its control by 1 on every scan, one where they tie.
    # Resampled by scan the interval would hug 0.5; by subject, a draw of the same subject twice gives 0 or 1
    a = np.array([1.0] * 10 + [0.0] * 10)
    b = np.zeros(20)
    groups = ["s1"] * 10 + ["s2"] * 10
    out = paired_mean_difference(a, b, groups, seed=0, n_resamples=500)
    assert out["diff"] == pytest.approx(0.5) and out["n"] == 20
    assert out["ci"] == [0.0, 1.0]
    # a constant gap is certain; NaN scans (a caption without the scored claims) are left out
    shifted = paired_mean_difference(np.r_[b + 0.2, np.nan], np.r_[b, 0.0], groups + ["s3"], n_resamples=200)
    assert shifted["diff"] == pytest.approx(0.2) and shifted["n"] == 20
    assert shifted["ci"] == pytest.approx([0.2, 0.2])
