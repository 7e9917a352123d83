"""`report.html` of `fmrilm eval`: one self-contained file (no network: styles inline, figures as base64 PNG).

Sections: the run; ONE summary table first (a row per task: each protocol's headline figure, AUC or MAE, with its
95 % interval, beside the FC baseline's, and the model-minus-FC difference with its paired interval), so a reader
sees at a glance what holds; then per task a table of every figure with its interval, the differences against the
FC baseline, ROC curves with a bootstrap band, confusion matrices and a reliability diagram (before and after
temperature scaling where the entry has it) per classification task, predicted against true values per regression
task; the skipped tasks with their reasons; generated descriptions of test scans next to their true captions.
Figures by matplotlib (Agg).

Reads, per task of metrics.json (`evaluation.metrics.add_intervals` writes the intervals): `<name>[figure]`,
`<name>["ci"][figure] = [lo, hi]`, `<name>["vs_fc_baseline"][figure] = {"diff", "ci"}`, `<name>["ece_scaled"]`,
`entry["temperature"]` (one T, or {protocol: T}) and `entry["bootstrap"]` (how the intervals were drawn); an entry
without them (an older metrics.json) renders with the bare figures. From predictions.json, per task: "y", each
name's test-scan predictions (log-odds of class 1 for a classification, values with None for a miss for a
regression) and "subjects" (the subject of each test scan, for the ROC band; without it the curves have no band).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from scipy.special import expit

from evaluation.metrics import (
    BASELINES,
    COMPARED,
    FC,
    HEADLINE,
    LOWER_IS_BETTER,
    protocols,
    reliability,
    roc_band,
    roc_points,
)

CLASS_METRICS = ("n", "accuracy", "balanced_accuracy", "auc", "f1", "ece", "ece_scaled")
REG_METRICS = ("n", "misses", "miss_rate", "mae", "r", "r2")
COUNTS = ("n", "misses")
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}
span.ci,span.diff{color:#555;font-size:90%}img{max-width:100%;display:block;margin:0.5em 0}.note{color:#555}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v, count: bool = False, signed: bool = False) -> str:
    """A figure as printed (3 decimals, a count as an integer); '' when absent, 'n/a' when undefined."""
    v = _number(v)
    if v is None:
        return ""
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.0f}" if count else f"{v:+.3f}" if signed else f"{v:.3f}"


def _ci(ci) -> str:
    """'[lo, hi]' of an interval; '[n/a]' where the metric has none (undefined), '' where none was computed."""
    if ci is None:
        return "[n/a]"
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _figure_html(figures: dict, metric: str) -> str:
    """'0.946 <span class=ci>[0.900, 0.980]</span>' (the interval only where metrics.json has one)."""
    text = html.escape(_fmt(figures.get(metric), metric in COUNTS))
    cis = figures.get("ci")
    if isinstance(cis, dict) and metric in cis:
        text += f' <span class="ci">{_ci(cis[metric])}</span>'
    return text


def _diff_html(figures: dict, metric: str) -> str:
    """'<span class=diff>Δ +0.050 [-0.020, 0.120]</span>' of a model-minus-FC difference, '' without one."""
    d = (figures.get("vs_fc_baseline") or {}).get(metric)
    if not isinstance(d, dict):
        return ""
    return f'<span class="diff">\u0394 {_fmt(d.get("diff"), signed=True)} {_ci(d.get("ci"))}</span>'


def summary_columns(metrics: dict) -> list[str]:
    """The protocols of the summary table, first seen first, the baselines last (fc_baseline is its own column)."""
    names: list[str] = []
    for entry in metrics.values():
        if "skipped" not in entry:
            names += [p for p in protocols(entry) if p not in names and p not in BASELINES]
    return names + [b for b in BASELINES if b != FC and any(b in e for e in metrics.values())]


def summary_table(metrics: dict) -> str:
    """A row per task: the headline figure of the FC baseline and of every protocol with its interval, and under
    each protocol's its difference from the FC baseline with the paired interval."""
    columns = summary_columns(metrics)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [FC] + columns)
    rows = []
    for task, entry in metrics.items():
        if "skipped" in entry:
            continue
        metric = HEADLINE[entry["kind"]]
        cells = []
        for name in [FC] + columns:
            figures = entry.get(name)
            if not isinstance(figures, dict):
                cells.append("<td></td>")
                continue
            diff = _diff_html(figures, metric)
            cells.append(f'<td data-protocol="{html.escape(name)}"><span class="fig">{_figure_html(figures, metric)}'
                         f"</span>{'<br>' + diff if diff else ''}</td>")
        rows.append(f'<tr><td class="l">{html.escape(task)}</td><td class="l">{metric}</td>{"".join(cells)}</tr>')
    return ('<h2>Summary</h2><table id="summary"><tr><th class="l">task</th><th class="l">metric</th>'
            f"{head}</tr>" + "".join(rows) + "</table>"
            '<p class="note">Each figure with its 95 % percentile bootstrap interval over test subjects (a subject\'s '
            "scans resampled together, within the class strata for a classification); \u0394: the protocol minus "
            "the FC baseline on the same resampled subjects (paired), positive = better for AUC, negative = better "
            "for MAE.</p>")


def task_table(name: str, entry: dict) -> str:
    cols = CLASS_METRICS if entry["kind"] == "classification" else REG_METRICS
    present = [c for c in cols if any(isinstance(entry[p], dict) and c in entry[p] for p in protocols(entry))]
    head = "".join(f"<th>{c}</th>" for c in present)
    rows = []
    for protocol in protocols(entry):
        figures = entry[protocol]
        cells = "".join(f"<td>{_figure_html(figures, c)}</td>" for c in present)
        rows.append(f'<tr><td class="l">{html.escape(protocol)}</td>{cells}</tr>')
    out = (f'<table id="table-{html.escape(name)}"><tr><th class="l">{html.escape(name)}: protocol</th>{head}</tr>'
           + "".join(rows) + "</table>")
    compared = COMPARED[entry["kind"]]
    versus = [p for p in protocols(entry) if isinstance(entry[p].get("vs_fc_baseline"), dict)]
    if versus:
        out += (f'<table id="vs-fc-{html.escape(name)}"><tr><th class="l">{html.escape(name)}: minus fc_baseline'
                "</th>" + "".join(f"<th>\u0394 {m}</th>" for m in compared) + "</tr>"
                + "".join(f'<tr><td class="l">{html.escape(p)}</td>'
                          + "".join(f"<td>{_diff_html(entry[p], m)}</td>" for m in compared) + "</tr>"
                          for p in versus) + "</table>")
    notes = []
    temperature = entry.get("temperature")
    if isinstance(temperature, dict):
        notes.append("temperature (fitted on the val split): " + ", ".join(
            f"{html.escape(p)} T = {_fmt(t)}" for p, t in temperature.items()))
    elif _number(temperature) is not None:
        notes.append(f"temperature (fitted on the val split): T = {_fmt(temperature)}")
    if notes:
        notes.append("ece_scaled: the ECE of sigmoid(log-odds / T) on the test split")
    boot = entry.get("bootstrap")
    if isinstance(boot, dict):
        notes.append(f"intervals: {boot.get('resamples')} {boot.get('method')} bootstrap resamples of the "
                     f"{boot.get('subjects')} test subjects (seed {boot.get('seed')})")
    undefined = {p: entry[p]["ci_undefined"] for p in protocols(entry) if entry[p].get("ci_undefined")}
    if undefined:
        notes.append("resamples where a figure was undefined, left out of its interval: " + "; ".join(
            f"{html.escape(p)} " + ", ".join(f"{m} {c}" for m, c in u.items()) for p, u in undefined.items()))
    lower = ", ".join(m for m in LOWER_IS_BETTER if m in present)
    if lower:
        notes.append(f"lower is better for {lower}")
    return out + "".join(f'<p class="note">{n}</p>' for n in notes)


def _temperature(entry: dict, protocol: str) -> float | None:
    """The temperature of a protocol: entry["temperature"][protocol], or the task's single T for a protocol whose
    figures carry an ece_scaled."""
    t = entry.get("temperature")
    if isinstance(t, dict):
        return _number(t.get(protocol))
    return _number(t) if "ece_scaled" in entry.get(protocol, {}) else None


def _label(entry: dict, p: str, metric: str, digits: int = 2) -> str:
    figures = entry.get(p, {})
    v = _number(figures.get(metric))
    text = f"{metric.upper()} {v:.{digits}f}" if v is not None and np.isfinite(v) else f"{metric.upper()} n/a"
    ci = (figures.get("ci") or {}).get(metric)
    if isinstance(ci, list) and len(ci) == 2:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{p} ({text})"


def classification_figures(name: str, entry: dict, preds: dict) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    y = np.asarray(preds["y"], int)
    protocols_ = [p for p in protocols(entry) if p in preds]
    subjects = preds.get("subjects")
    seed = int((entry.get("bootstrap") or {}).get("seed", 0))
    figures = []
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p in protocols_:
        s = np.asarray(preds[p], float)
        fpr, tpr = roc_points(y, s)
        line, = ax.plot(fpr, tpr, label=_label(entry, p, "auc"))
        if subjects is not None and len(subjects) == len(y):  # the band: the same subject resamples as the figures
            grid, lo, hi = roc_band(y, s, np.asarray(subjects), seed=seed)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    band = " with 95 % bands over test subjects" if subjects is not None else ""
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{name}: ROC (test split){band}")
    ax.legend(fontsize=7)
    figures.append((f"{name} ROC curves", _png(fig)))
    fig, axes = plt.subplots(1, max(1, len(protocols_)), figsize=(3.4 * max(1, len(protocols_)), 3.2), squeeze=False,
                             constrained_layout=True)
    options = entry.get("options", ["0", "1"])
    for ax, p in zip(axes[0], protocols_):
        cm = confusion_matrix(y, (np.asarray(preds[p], float) > 0).astype(int), labels=[0, 1])  # log-odds > 0
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=options, yticklabels=options, xlabel="predicted",
               ylabel="true", title=p)
        ax.tick_params(labelsize=7)
    figures.append((f"{name} confusion matrices", _png(fig)))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p in protocols_:
        s = np.asarray(preds[p], float)
        r = reliability(y, expit(s))
        line, = ax.plot(r["prob_pred"], r["prob_true"], "o-", label=f"{p} (ECE {_fmt(entry[p].get('ece'))})")
        t = _temperature(entry, p)
        if t is not None and t > 0:  # after temperature scaling: the same scans, sigmoid(log-odds / T)
            r = reliability(y, expit(s / t))
            ax.plot(r["prob_pred"], r["prob_true"], "s--", color=line.get_color(),
                    label=f"{p} / T={t:.2f} (ECE {_fmt(entry[p].get('ece_scaled'))})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel=f"predicted probability of {options[1]!r}", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1),
           title=f"{name}: reliability (10 uniform bins)")
    ax.legend(fontsize=7)
    figures.append((f"{name} reliability diagram", _png(fig)))
    return figures


def regression_figures(name: str, entry: dict, preds: dict) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    y = np.asarray(preds["y"], float)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p in [p for p in protocols(entry) if p in preds]:
        v = np.array([np.nan if x is None else x for x in preds[p]], float)
        ok = np.isfinite(v)
        misses = _number(entry[p].get("misses"))
        ax.scatter(y[ok], v[ok], s=12, label=_label(entry, p, "mae", 1)
                   + (f", misses {int(misses)}" if misses is not None else ""))
    lo, hi = float(np.min(y)), float(np.max(y))
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: predicted vs true (test split)")
    ax.legend(fontsize=7)
    return [(f"{name} predicted vs true", _png(fig))]


def ablation_rows(summary: dict) -> list[tuple[str, str, str, list[float | None]]]:
    """(task, protocol, metric, the headline figure of every variant in `summary` order) per task x protocol of
    an ablation summary (`fmrilm.ablations`); shared by the report and the terminal table."""
    names = list(summary)
    keys = sorted({(task, protocol) for v in summary.values() for task, protocols in v["figures"].items()
                   for protocol in protocols})
    return [(task, protocol, next((v["metrics"][task] for v in summary.values() if task in v["metrics"]), ""),
             [summary[n]["figures"].get(task, {}).get(protocol) for n in names]) for task, protocol in keys]


def ablation_section(summary: dict) -> str:
    """The ablation variants side by side (`fmrilm.ablations`): per task x protocol, the headline figure of each."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in summary)
    body = [f'<tr><td class="l">{html.escape(task)}</td><td class="l">{html.escape(protocol)}</td>'
            f'<td class="l">{metric}</td>' + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>"
            for task, protocol, metric, values in ablation_rows(summary)]
    overrides = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(', '.join(v['overrides']) or 'as configured')}"
                        "</li>" for n, v in summary.items())
    return (f"<h2>Ablations</h2><ul>{overrides}</ul><table id=\"ablations\"><tr><th class=\"l\">task</th>"
            f"<th class=\"l\">protocol</th><th class=\"l\">metric</th>{head}</tr>" + "".join(body) + "</table>")


def render(metrics: dict, predictions: dict, descriptions: list[dict], info: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fMRI-LM evaluation</title>"
             f"<style>{STYLE}</style></head><body><h1>fMRI-LM evaluation</h1>"]
    run = {k: info.get(k) for k in ("model", "corpus", "stage", "shots", "seed", "max_test", "prompt_format",
                                     "test_subjects", "test_scans")}
    parts.append('<table id="run">' + "".join(f'<tr><th class="l">{html.escape(k)}</th><td class="l">'
                                             f"{html.escape(str(v))}</td></tr>" for k, v in run.items()) + "</table>")
    parts.append('<p class="note">Every figure is on the test split. Protocols: zero_shot (no examples), '
                 "k_shot_k (k train-split examples in context), train_n_n (fine-tuned on n train subjects), tuned "
                 "(fine-tuned on every train scan of the task); for a stage-3 model, zero_shot of a task in its "
                 "tuning mix is the multi-task tuned figure. "
                 "fc_baseline: Fisher-z FC + logistic / ridge regression; tokenizer_probe: linear probe on the "
                 "frozen stage-1 features; both with the regularisation chosen by CV on the train split.</p>")
    skipped = {k: v["skipped"] for k, v in metrics.items() if "skipped" in v}
    if len(skipped) < len(metrics):
        parts.append(summary_table(metrics))
    for name, entry in metrics.items():
        if name in skipped:
            continue
        parts.append(f"<h2>{html.escape(name)} ({entry['kind']}, {entry['n_test']} test scans)</h2>")
        parts.append(task_table(name, entry))
        preds = predictions.get(name, {})
        if "y" not in preds:
            parts.append('<p class="note">no predictions for this task: no figures</p>')
            continue
        figs = (classification_figures if entry["kind"] == "classification" else regression_figures)(name, entry,
                                                                                                       preds)
        parts += [_img(src, alt) for alt, src in figs]
    if skipped:
        parts.append('<h2>Skipped tasks</h2><table id="skipped"><tr><th class="l">task</th><th class="l">why</th></tr>'
                     + "".join(f'<tr><td class="l">{html.escape(k)}</td><td class="l">{html.escape(v)}</td></tr>'
                               for k, v in skipped.items()) + "</table>")
    if info.get("ablations"):
        parts.append(ablation_section(info["ablations"]))
    if descriptions:
        parts.append('<h2>Generated descriptions</h2><table id="descriptions"><tr><th class="l">scan</th>'
                     '<th class="l">generated</th><th class="l">true caption</th></tr>'
                     + "".join(f'<tr><td class="l">{html.escape(d["key"])}</td><td class="l">'
                               f'{html.escape(d["generated"]) or "<i>(no text)</i>"}</td><td class="l">'
                               f'{html.escape(d["true"])}</td></tr>' for d in descriptions) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path, metrics: dict, predictions: dict, descriptions: list[dict], info: dict) -> Path:
    path = Path(path)
    path.write_text(render(metrics, predictions, descriptions, info), encoding="utf-8")
    return path
