"""`report.html` of `fmrilm eval`: one self-contained file (no network: styles inline, figures as base64 PNG).

Sections: the run; per task a table of every protocol beside the baselines; ROC curves, confusion matrices and a
reliability diagram per classification task, predicted against true values per regression task; the skipped tasks
with their reasons; generated descriptions of test scans next to their true captions. Figures by matplotlib (Agg).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from llm_train.scoring import reliability

CLASS_METRICS = ("n", "accuracy", "balanced_accuracy", "auc", "f1", "ece")
REG_METRICS = ("n", "misses", "mae", "r", "r2")
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}
img{max-width:100%;display:block;margin:0.5em 0}.note{color:#555}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _protocols(entry: dict) -> list[str]:
    return [k for k, v in entry.items() if isinstance(v, dict) and k not in ("regularisation",)]


def _fmt(v, count: bool = False) -> str:
    if v is None:
        return ""
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.0f}" if count else f"{v:.3f}"


def task_table(name: str, entry: dict) -> str:
    cols = CLASS_METRICS if entry["kind"] == "classification" else REG_METRICS
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = []
    for protocol in _protocols(entry):
        figures = entry[protocol]
        cells = "".join(f"<td>{_fmt(figures.get(c), c in ('n', 'misses'))}</td>" for c in cols)
        rows.append(f'<tr><td class="l">{html.escape(protocol)}</td>{cells}</tr>')
    return (f'<table id="table-{html.escape(name)}"><tr><th class="l">{html.escape(name)}: protocol</th>{head}</tr>'
            + "".join(rows) + "</table>")


def classification_figures(name: str, entry: dict, preds: dict) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, roc_curve

    y = np.asarray(preds["y"], int)
    protocols = [p for p in _protocols(entry) if p in preds]
    figures = []
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p in protocols:
        fpr, tpr, _ = roc_curve(y, preds[p])
        ax.plot(fpr, tpr, label=f"{p} (AUC {entry[p]['auc']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{name}: ROC (test split)")
    ax.legend(fontsize=8)
    figures.append((f"{name} ROC curves", _png(fig)))
    fig, axes = plt.subplots(1, len(protocols), figsize=(3.4 * len(protocols), 3.2), squeeze=False,
                             constrained_layout=True)
    options = entry.get("options", ["0", "1"])
    for ax, p in zip(axes[0], protocols):
        cm = confusion_matrix(y, (np.asarray(preds[p]) > 0.5).astype(int), labels=[0, 1])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=options, yticklabels=options, xlabel="predicted",
               ylabel="true", title=p)
        ax.tick_params(labelsize=7)
    figures.append((f"{name} confusion matrices", _png(fig)))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p in protocols:
        r = reliability(y, np.asarray(preds[p], float))
        ax.plot(r["prob_pred"], r["prob_true"], "o-", label=f"{p} (ECE {entry[p]['ece']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel=f"predicted probability of {options[1]!r}", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1),
           title=f"{name}: reliability (10 uniform bins)")
    ax.legend(fontsize=8)
    figures.append((f"{name} reliability diagram", _png(fig)))
    return figures


def regression_figures(name: str, entry: dict, preds: dict) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    y = np.asarray(preds["y"], float)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p in [p for p in _protocols(entry) if p in preds]:
        v = np.array([np.nan if x is None else x for x in preds[p]], float)
        ok = np.isfinite(v)
        ax.scatter(y[ok], v[ok], s=12, label=f"{p} (MAE {_fmt(entry[p]['mae'])}, misses {int(entry[p]['misses'])})")
    lo, hi = float(np.min(y)), float(np.max(y))
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: predicted vs true (test split)")
    ax.legend(fontsize=8)
    return [(f"{name} predicted vs true", _png(fig))]


def ablation_rows(summary: dict) -> list[tuple[str, str, str, list[float | None]]]:
    """(task, protocol, metric, the headline figure of every variant in `summary` order) per task x protocol of
    an ablation summary (`cluster.ablations`); shared by the report and the terminal table."""
    names = list(summary)
    keys = sorted({(task, protocol) for v in summary.values() for task, protocols in v["figures"].items()
                   for protocol in protocols})
    return [(task, protocol, next((v["metrics"][task] for v in summary.values() if task in v["metrics"]), ""),
             [summary[n]["figures"].get(task, {}).get(protocol) for n in names]) for task, protocol in keys]


def ablation_section(summary: dict) -> str:
    """The ablation variants side by side (`cluster.ablations`): per task x protocol, the headline figure of each."""
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
    for name, entry in metrics.items():
        if name in skipped:
            continue
        parts.append(f"<h2>{html.escape(name)} ({entry['kind']}, {entry['n_test']} test scans)</h2>")
        parts.append(task_table(name, entry))
        preds = predictions.get(name, {})
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
