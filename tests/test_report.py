"""What a reader of `fmrilm eval` sees of the intervals: report.html's summary table (parsed, its numbers equal
metrics.json's to the printed precision), the per-task tables, the ROC bands and the temperature-scaled reliability,
an older metrics.json without intervals still rendering, the terminal table and the MLflow metric names. Synthetic
metrics.json-shaped entries built with `evaluation.metrics`; no model."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from evaluation import metrics as M

RESAMPLES = 300  # fewer than the default 1000: the test checks what is printed, not the intervals' precision


def _entries() -> tuple[dict, dict]:
    """(metrics, predictions) of a sex (classification) and an age (regression) task, two scans per subject."""
    rng = np.random.default_rng(0)
    subjects = np.repeat([f"s{i:02d}" for i in range(40)], 2)
    sex = np.repeat(rng.integers(0, 2, 40), 2)
    age = np.repeat(rng.uniform(40, 80, 40), 2) + rng.normal(0, 0.5, 80)
    cls = {"zero_shot": 1.5 * (2 * sex - 1) + rng.normal(0, 1, 80),
           "k_shot_2": 2.5 * (2 * sex - 1) + rng.normal(0, 1, 80),
           "fc_baseline": 1.0 * (2 * sex - 1) + rng.normal(0, 1, 80),
           "tokenizer_probe": rng.normal(0, 1, 80)}
    reg = {"zero_shot": age + rng.normal(0, 6, 80), "k_shot_2": age + rng.normal(0, 4, 80),
           "fc_baseline": age + rng.normal(0, 8, 80), "tokenizer_probe": np.full(80, 60.0) + rng.normal(0, 1, 80)}
    metrics = {"sex": {"kind": "classification", "question": "Sex?", "n_train": 100, "n_test": 80,
                       "options": ["Female", "Male"]},
               "age": {"kind": "regression", "question": "Age?", "n_train": 100, "n_test": 80},
               "ad": {"skipped": "no label"}}
    for name, p in cls.items():
        metrics["sex"][name] = M.classification_figures(sex, p)
    metrics["sex"]["zero_shot"]["ece_scaled"] = M.classification_figures(sex, cls["zero_shot"] / 2.0)["ece"]
    metrics["sex"]["temperature"] = {"zero_shot": 2.0}
    for name, p in reg.items():
        metrics["age"][name] = M.regression_figures(age, p) | {"misses": 0.0, "miss_rate": 0.0}
    for b in ("fc_baseline", "tokenizer_probe"):
        metrics["sex"][b]["regularisation"] = metrics["age"][b]["regularisation"] = {"param": "C", "value": 1.0}
    M.add_intervals(metrics["sex"], sex, cls, subjects, n_resamples=RESAMPLES)
    M.add_intervals(metrics["age"], age, reg, subjects, n_resamples=RESAMPLES)
    predictions = {"sex": {"y": sex.tolist(), "subjects": subjects.tolist()} | {k: v.tolist() for k, v in cls.items()},
                   "age": {"y": age.tolist(), "subjects": subjects.tolist()} | {k: v.tolist() for k, v in reg.items()}}
    return metrics, predictions


@pytest.fixture(scope="module")
def built():
    return _entries()


class Page(HTMLParser):
    """Tables as {id: [rows of {"text", "protocol", "fig", "diff"} cells]} and the images of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[dict]]] = {}
        self.images: list[dict] = []
        self._table, self._cell, self._spans = None, None, []  # the classes of the open spans

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {"text": "", "protocol": attrs.get("data-protocol"), "fig": "", "diff": ""}
            self._table[-1].append(self._cell)
        elif tag == "span" and self._cell is not None:
            self._spans.append(attrs.get("class"))
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "span" and self._spans:
            self._spans.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
            for kind in {"fig", "diff"} & set(self._spans):  # a figure's text includes its nested interval
                self._cell[kind] += data


def _page(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    return page


def _numbers(text: str) -> list[str]:
    return re.findall(r"[+-]?\d+\.\d+", text)


def test_the_summary_table_prints_metrics_json_figures_intervals_and_differences(built, tmp_path):
    from evaluation.report import write_report

    metrics, predictions = built
    page = _page(write_report(tmp_path / "report.html", metrics, predictions, [], {}).read_text())
    html_text = (tmp_path / "report.html").read_text()
    assert html_text.index('id="summary"') < html_text.index('id="table-sex"')  # the summary comes first
    header, *rows = page.tables["summary"]
    assert [c["text"] for c in header] == ["task", "metric", "fc_baseline", "zero_shot", "k_shot_2",
                                           "tokenizer_probe"]
    assert [r[0]["text"] for r in rows] == ["sex", "age"]  # a skipped task has no row
    checked = 0
    for row in rows:
        task, metric = row[0]["text"], row[1]["text"]
        assert metric == M.HEADLINE[metrics[task]["kind"]]
        for cell in row[2:]:
            figures = metrics[task][cell["protocol"]]
            lo, hi = figures["ci"][metric]
            assert _numbers(cell["fig"]) == [f"{figures[metric]:.3f}", f"{lo:.3f}", f"{hi:.3f}"]
            if cell["protocol"] == "fc_baseline":
                assert cell["diff"] == ""
                continue
            d = figures["vs_fc_baseline"][metric]
            assert _numbers(cell["diff"]) == [f"{d['diff']:+.3f}", f"{d['ci'][0]:.3f}", f"{d['ci'][1]:.3f}"]
            assert d["diff"] == pytest.approx(figures[metric] - metrics[task]["fc_baseline"][metric], abs=1e-12)
            checked += 1
    assert checked == 6


def test_task_tables_show_every_figure_with_its_interval_and_the_roc_bands_exist(built, tmp_path):
    from evaluation.report import write_report

    metrics, predictions = built
    page = _page(write_report(tmp_path / "report.html", metrics, predictions, [], {}).read_text())
    header, *rows = page.tables["table-sex"]
    columns = [c["text"] for c in header][1:]
    assert columns == ["n", "accuracy", "balanced_accuracy", "auc", "f1", "ece", "ece_scaled"]
    for row in rows:
        figures = metrics["sex"][row[0]["text"]]
        for name, cell in zip(columns, row[1:]):
            if name in M.CLASSIFICATION:
                lo, hi = figures["ci"][name]
                assert _numbers(cell["text"]) == [f"{figures[name]:.3f}", f"{lo:.3f}", f"{hi:.3f}"], name
    scaled = {r[0]["text"]: r[-1]["text"] for r in rows}
    assert scaled["zero_shot"] == f"{metrics['sex']['zero_shot']['ece_scaled']:.3f}" and scaled["k_shot_2"] == ""
    assert [r[0]["text"] for r in page.tables["vs-fc-age"][1:]] == ["zero_shot", "k_shot_2", "tokenizer_probe"]
    text = (tmp_path / "report.html").read_text()
    assert "zero_shot T = 2.000" in text
    alts = {img["alt"]: img["src"] for img in page.images}
    assert set(alts) == {"sex ROC curves", "sex confusion matrices", "sex reliability diagram", "age predicted vs true"}
    for src in alts.values():
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_older_metrics_json_without_intervals_still_renders(built, tmp_path):
    from evaluation.report import write_report

    metrics, predictions = built
    old = {task: {k: ({m: v for m, v in f.items() if m not in ("ci", "ci_undefined", "vs_fc_baseline")}
                      if isinstance(f, dict) else f) for k, f in entry.items()
                  if k not in ("bootstrap", "temperature")} for task, entry in metrics.items()}
    old["sex"]["zero_shot"].pop("ece_scaled")
    bare = {task: {k: v for k, v in p.items() if k != "subjects"} for task, p in predictions.items()}
    page = _page(write_report(tmp_path / "old.html", old, bare, [], {}).read_text())
    row = page.tables["summary"][1]
    assert row[0]["text"] == "sex" and _numbers(row[2]["fig"]) == [f"{old['sex']['fc_baseline']['auc']:.3f}"]
    assert len(page.images) == 4
    page = _page(write_report(tmp_path / "nopreds.html", old, {}, [], {}).read_text())  # no predictions at all
    assert "table-age" in page.tables and page.images == []


def test_the_terminal_table_prints_intervals_and_the_difference_within_120_columns(built):
    from evaluation.task_eval import metrics_table

    metrics, _ = built
    table = metrics_table(metrics)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120
    z = metrics["sex"]["zero_shot"]
    lo, hi = z["ci"]["auc"]
    d = z["vs_fc_baseline"]["auc"]
    line = next(line for line in lines if line.startswith("sex") and " zero_shot " in line)
    assert f"auc {z['auc']:.3f} [{lo:.2f}, {hi:.2f}]" in line
    assert f"{d['diff']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" in line
    assert any(line.startswith("ad") and "skipped: no label" in line for line in lines)
    assert any(line.startswith("age") and "mae " in line for line in lines)


def test_mlflow_metric_names_carry_intervals_and_differences(built):
    from fmrilm.stages import flat_metrics

    metrics, _ = built
    flat = flat_metrics(metrics)
    z = metrics["age"]["zero_shot"]
    assert flat["age/zero_shot/mae"] == z["mae"]
    assert [flat["age/zero_shot/mae_ci_lo"], flat["age/zero_shot/mae_ci_hi"]] == z["ci"]["mae"]
    assert flat["age/zero_shot/mae_vs_fc"] == z["vs_fc_baseline"]["mae"]["diff"]
    assert [flat["age/zero_shot/mae_vs_fc_ci_lo"], flat["age/zero_shot/mae_vs_fc_ci_hi"]] == \
        z["vs_fc_baseline"]["mae"]["ci"]
    assert "age/fc_baseline/mae_vs_fc" not in flat
    assert all(isinstance(v, float) for v in flat.values())
    assert not any("/bootstrap/" in k or "regularisation" in k for k in flat)
    odd = {"t": {"kind": "regression", "zero_shot": {"mae": 1.0, "ci": {"mae": None, "r": [0.1]}, "lst": [1, 2],
                                                     "vs_fc_baseline": {"mae": {"diff": 0.5, "ci": None}, "r": 3}}},
           "s": {"skipped": "why"}}
    assert flat_metrics(odd) == {"t/zero_shot/mae": 1.0, "t/zero_shot/mae_vs_fc": 0.5}
