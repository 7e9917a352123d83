"""`fmrilm eval`: a model folder on the paper's tasks, beside the baselines, on the test split of a corpus.

    metrics = evaluate_tasks(model_dir, corpus, out, tasks=None, shots=(0, 2))

Writes (docs/design.md):
    OUT/metrics.json      task -> protocol (`zero_shot`, `k_shot_<k>`, `train_n_<n>`, `tuned`) -> figures, each with
                          its 95 % bootstrap interval over test subjects (`ci`) and, for a model protocol, its paired
                          difference from the FC baseline (`vs_fc_baseline`); beside them `fc_baseline` and
                          `tokenizer_probe` on the same test scans; a skipped task is {"skipped": reason}
    OUT/predictions.json  every test scan's label and prediction per task and protocol (what the figures show)
    OUT/eval.json         the run: model, corpus and its fingerprint, the lineage check (internal or external), per
                          task whether its attribute was in the tuning mix (read from the items the model was tuned
                          on), the in-context examples and fine-tuning sets with how many examples each saw
    OUT/fine_tuned/       the folders fine-tuned for `train_n_<n>` and `tuned`, keyed by their inputs
    OUT/report.html       self-contained report (`evaluation.report`)

Protocols (`evaluation.protocols`): `zero_shot` (no examples: for a stage-3 folder the multi-task figure of a task in
its tuning mix, a true zero-shot one for a task left out of it), `k_shot_<k>` (k class-balanced examples from
train subjects in context, in a seeded order per test scan), `train_n_<n>` (the paper's few-shot: the folder
instruction-tuned on n class-balanced train subjects, then asked with no examples) and `tuned` (the same on every
labelled train scan for `tuned_epochs` epochs).

Classification: the log-likelihood difference of the two answers (log-odds; AUC from it, so nothing saturates into
ties), beside the same per answer token; optionally temperature-scaled on the val split (ECE before and after).
Regression: constrained greedy decoding (`greedy`) or the probability-weighted mean over a grid of values
(`expected`); a miss takes the train-split mean and is counted, so MAE / r / R^2 cover every test scan, as the
baselines do.

What may be scored is checked first (`fmrilm_core.lineage`): the corpus must be the one the model was trained on
and no test subject a training subject of any stage; `external=True` scores every scan of a cohort that shares no
subject with the lineage, with the examples, fine-tunings and baselines from the model's own training corpus, so
everything is judged out of sample.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from corpus_builder.lineage import corpus_fingerprint, split_subjects
from corpus_builder.readers import read_captions, read_manifest, read_phenotypes
from evaluation.baselines import fc_features, fit_predict, probe_features
from evaluation.metrics import (
    BASELINES,
    HEADLINE,
    add_intervals,
    classification_figures,
    fit_temperature,
    protocols,
    regression_figures,
)
from evaluation.protocols import (  # noqa: F401  (ScanCache, choose_shots: part of this module's API)
    Asker,
    ScanCache,
    check_fine_tunings,
    choose_shots,
    fine_tune_key,
    fine_tune_on,
    make_shot,
    progress_for,
    tuned_steps,
    value_grid,
    with_fallback,
)
from evaluation.tasks import TaskData, select_tasks
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import check_corpus, grown_from, new_since, read_lineage
from fmrilm_core.model_card import CARD, add_figures
from llm_train.export import check_atlas, load_aligned  # noqa: F401  (check_atlas: part of this module's API)
from llm_train.scoring import check_context, question_ids

MAX_VAL_SCANS = 64  # val scans scored to fit the temperature


def protocol_name(k: int) -> str:
    return "zero_shot" if k == 0 else f"k_shot_{k}"


def all_phenotypes(corpus: Path) -> pd.DataFrame:
    """Every split's phenotypes (an external cohort: all its scans are test scans)."""
    return pd.concat([read_phenotypes(corpus, split) for split in ("train", "val", "test")])


def in_tuning_mix(meta: dict, attribute: str) -> bool | None:
    """Whether the folder was tuned on items naming `attribute`, from the attributes of the items it was actually
    trained on (recorded by stage 3); None for a folder that was not instruction-tuned (stage 2 never sees a
    phenotype)."""
    instruct = meta.get("instruct")
    if instruct is None:
        return None
    if "trained_attributes" not in instruct:  # saved before the record: its descriptions named every phenotype
        return True
    trained = instruct["trained_attributes"]
    return None if trained is None else attribute in trained


@dataclass
class Shared:
    """What every task of one evaluation uses: the model, the scans of the evaluated corpus (`cache`) and of the
    model's training corpus (`own_cache`: examples, fine-tunings, baselines), the phenotypes, the settings."""

    model: object
    tokenizer: object
    fmt: str
    brain_tokenizer: object
    cache: ScanCache
    own_cache: ScanCache
    train_pheno: pd.DataFrame
    val_pheno: pd.DataFrame
    test_pheno: pd.DataFrame
    batch_size: int
    device: object
    seed: int
    regression: str
    temperature: bool
    progress_fn: object


class TaskScoring:
    """One task's entry of metrics.json and predictions.json, protocol by protocol, then the baselines and the
    intervals (`finish`)."""

    def __init__(self, shared: Shared, data: TaskData, max_test: int | None):
        self.s, self.data, task = shared, data, data.task
        self.classification = task.kind == "classification"
        keys = sorted(data.test.index)
        if max_test is not None and len(keys) > max_test:
            keys = sorted(random.Random(f"{shared.seed}-{task.name}").sample(keys, max_test))
        self.test_keys, self.y = keys, data.test[keys].to_numpy()
        self.val = task.labels(shared.val_pheno)
        self.val_keys = sorted(random.Random(f"{shared.seed}-{task.name}-val").sample(
            sorted(self.val.index), min(MAX_VAL_SCANS, len(self.val))))
        self.entry: dict = {"kind": task.kind, "question": task.question, "n_train": len(data.train),
                            "n_test": len(keys)}
        self.fallback = self.grid = None
        if self.classification:
            self.entry["options"] = list(task.options)
        else:
            self.fallback = float(np.mean(data.train.to_numpy()))
            self.grid = value_grid(data.train.to_numpy()) if shared.regression == "expected" else None
            self.entry["decoding"] = shared.regression
            self.entry["fallback"] = {"rule": "train-split mean", "value": self.fallback}
        self.preds: dict = {"keys": keys, "y": self.y.tolist()}
        self.temperatures: dict[str, float] = {}

    def shots(self, k: int) -> list[str]:
        """k class-balanced train scans of train subjects; checked to fit the model's context."""
        s, data = self.s, self.data
        chosen = choose_shots(data, s.train_pheno, set(s.test_pheno["subject"]), k, s.seed)
        if chosen:
            answers = [s.tokenizer(o, add_special_tokens=False)["input_ids"] for o in data.task.options] or [[0] * 6]
            context = [make_shot(s.tokenizer, s.fmt, data, s.own_cache, key) for key in chosen]
            check_context(s.model, context, question_ids(s.tokenizer, data.task.question, s.fmt),
                          1 + max(len(a) for a in answers))
        return chosen

    def protocol(self, name: str, model, tokenizer, fmt: str, chosen: list[str]) -> None:
        """Ask every test scan with the train scans `chosen` in context (and val scans, for the temperature)."""
        s, y, keys = self.s, self.y, self.test_keys
        with progress_for(s.progress_fn, f"eval {self.data.task.name} {name}: scans", len(keys)) as progress:
            asker = Asker(model, tokenizer, fmt, self.data, s.cache, s.own_cache, chosen, s.batch_size, s.device,
                          s.seed, progress)
            if self.classification:
                got = asker.classify(keys)
                figures = classification_figures(y, got["logodds"])
                figures["auc_per_token"] = classification_figures(y, got["logodds_per_token"])["auc"]
                self.preds[name] = got["logodds"].tolist()
                self.preds[name + "_per_token"] = got["logodds_per_token"].tolist()
            else:
                answered = asker.regress(keys, s.regression, self.grid)
                values, misses = with_fallback([v for v, _ in answered], self.fallback)
                figures = regression_figures(y, values) | {"misses": float(misses),
                                                           "miss_rate": misses / max(1, len(keys))}
                self.preds[name], self.preds[name + "_text"] = values.tolist(), [t for _, t in answered]
        if self.classification and s.temperature and len(set(self.val[self.val_keys])) == 2:
            val_asker = Asker(model, tokenizer, fmt, self.data, s.own_cache, s.own_cache, chosen, s.batch_size,
                              s.device, s.seed)
            t = fit_temperature(val_asker.classify(self.val_keys)["logodds"], self.val[self.val_keys].to_numpy())
            self.temperatures[name] = t
            figures["ece_scaled"] = classification_figures(y, np.asarray(self.preds[name]) / t)["ece"]
        self.entry[name] = figures

    def finish(self) -> tuple[dict, dict]:
        """The baselines on the same test scans, then every figure's interval: (entry, predictions)."""
        s, data, y, keys = self.s, self.data, self.y, self.test_keys
        train_keys = sorted(data.train.index)
        groups = s.train_pheno.loc[train_keys, "subject"].astype(str).to_numpy()
        y_train = data.train[train_keys].to_numpy()
        readers = {"fc_baseline": fc_features,
                   "tokenizer_probe": lambda x: probe_features(s.brain_tokenizer, x)}
        for base, features in readers.items():
            pred, chosen = fit_predict(features(s.own_cache.series(train_keys)), y_train, groups,
                                       features(s.cache.series(keys)), self.classification, s.seed)
            self.entry[base] = (classification_figures(y, pred) if self.classification else
                                regression_figures(y, np.asarray(pred, float)))
            self.entry[base]["regularisation"] = chosen
            self.preds[base] = [float(v) for v in pred]
        if self.temperatures:
            self.entry["temperature"] = self.temperatures
        subjects = s.test_pheno.loc[keys, "subject"].astype(str).to_numpy()
        self.preds["subjects"] = subjects.tolist()  # the bootstrap's unit (pseudonyms, as in the corpus's keys)
        scored = {name: np.asarray(self.preds[name], float) for name, v in self.entry.items()
                  if isinstance(v, dict) and name in self.preds}
        add_intervals(self.entry, y, scored, subjects, s.seed)
        return self.entry, self.preds


def evaluate_tasks(model_dir: Path, corpus: Path, out: Path, *, tasks: list[str] | None = None,
                   shots: tuple[int, ...] = (0,), seed: int = 0, max_test: int | None = None, batch_size: int = 8,
                   examples: int = 4, max_new_tokens: int = 96, device: str | None = None,
                   report: bool = True, train_n: tuple[int, ...] = (), tuned: bool = False,
                   tuned_epochs: float = 1.0, instruct_cfg=None, progress_fn=None, external: bool = False,
                   resume: bool = False, regression: str = "greedy", temperature: bool = True,
                   train_runner=None) -> dict:
    """Score the model folder and the baselines on the test split (every scan with `external`); write OUT (see the
    module doc); return the metrics. `max_test` caps the test scans per task (a seeded subset, for quick runs).
    `train_n`: for each N, the folder fine-tuned on N class-balanced train subjects (one scan each) with
    `instruct_cfg` (an InstructConfig; None = 20 steps), scored zero-shot as `train_n_<N>`; `tuned`: the same on
    every labelled train scan of the task for `tuned_epochs` epochs, scored as `tuned`. Fine-tunings land in
    OUT/fine_tuned/, keyed by their inputs (`resume`: refuse a stale one instead of redoing it); training steps and
    scans scored are reported through `progress_fn(stage, total, start, rank)` (silent without one).
    `train_runner(train_fn, cfg, inputs, name) -> metrics` runs each fine-tuning (e.g. on Ray Train workers); None
    runs it in-process (`protocols.fine_tune_on`)."""
    model_dir, corpus, out = Path(model_dir), Path(corpus), Path(out)
    shots = tuple(sorted(set(int(k) for k in shots)))
    if any(k < 0 for k in shots):
        raise InputError(f"--shots: counts must be >= 0, got {list(shots)}")
    train_n = tuple(sorted(set(int(n) for n in train_n)))
    if any(n < 1 for n in train_n):
        raise InputError(f"--train-n: counts must be >= 1, got {list(train_n)}")
    if regression not in ("greedy", "expected"):
        raise InputError(f"regression decoding {regression!r}: choose greedy or expected")
    meta = check_atlas(model_dir, corpus)
    lineage = read_lineage(model_dir)
    fingerprint = corpus_fingerprint(corpus)
    own = Path(lineage["corpus"]["path"])  # the model's training corpus: examples, fine-tunings, baselines
    if external:
        if not own.is_dir() or not grown_from(lineage["corpus"], corpus_fingerprint(own)):
            raise InputError(f"{model_dir}: its training corpus {own} is gone or has changed; an external "
                             "evaluation fits the baselines and draws its examples there")
        check_atlas(model_dir, own)
        test_pheno, test_subjects = all_phenotypes(corpus), split_subjects(corpus)
    else:
        own = corpus
        test_pheno, test_subjects = read_phenotypes(corpus, "test"), split_subjects(corpus, "test")
    check = check_corpus(lineage, fingerprint, test_subjects, external)
    if not external:  # a corpus grown since the model was trained: which test scans it has never been shown
        check["new_test_scans"] = new_test_scans(corpus, new_since(lineage["corpus"], fingerprint))
    key = fine_tune_key(model_dir, own) if train_n or tuned else None
    if resume and key is not None:
        check_fine_tunings(out, key)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_pheno, val_pheno = read_phenotypes(own, "train"), read_phenotypes(own, "val")
    if test_pheno.empty:
        raise InputError(f"{corpus}: {'the cohort' if external else 'the test split'} has no scans")
    try:
        runnable, skipped = select_tasks(tasks, train_pheno, test_pheno)
    except ValueError as err:
        raise InputError(str(err)) from None
    model, tokenizer, brain_tokenizer, meta = load_aligned(model_dir, device)
    fmt = meta.get("prompt_format", "plain")
    features = meta["input_mode"] == "features"
    cache = ScanCache(corpus, brain_tokenizer, features, model.connectivity)
    own_cache = cache if own == corpus else ScanCache(own, brain_tokenizer, features, model.connectivity)
    shared = Shared(model, tokenizer, fmt, brain_tokenizer, cache, own_cache, train_pheno, val_pheno, test_pheno,
                    batch_size, device, seed, regression, temperature, progress_fn)
    metrics: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    used_shots: dict[str, dict] = {}
    fine_tunings: dict[str, dict] = {}  # per task and protocol: what each fine-tuning was made from, what it saw
    fine_tuning_sets: dict[str, dict] = {}  # ... and the train scans it was tuned on
    mix: dict[str, bool | None] = {}
    for data in runnable:
        task = data.task
        scoring = TaskScoring(shared, data, max_test)
        mix[task.name] = scoring.entry["in_tuning_mix"] = in_tuning_mix(meta, task.attribute)
        for k in shots:
            chosen = scoring.shots(k)
            used_shots.setdefault(task.name, {})[str(k)] = chosen
            scoring.protocol(protocol_name(k), model, tokenizer, fmt, chosen)
        fine_tunes = {f"train_n_{n}": scoring.shots(n) for n in train_n}
        if tuned:
            fine_tunes["tuned"] = sorted(data.train.index)  # every train scan with the task's label
        for name, chosen in fine_tunes.items():
            cfg = instruct_cfg
            if name == "tuned":  # epochs over every labelled train scan, not a fixed step count
                from llm_train.config import InstructConfig

                cfg = cfg if cfg is not None else InstructConfig(eval_items=4)
                steps = tuned_steps(len(chosen), tuned_epochs, cfg.batch_size)
                cfg = cfg.model_copy(update={"steps": steps, "checkpoint_every": steps, "eval_every": steps})
            tuned_dir = out / "fine_tuned" / f"{task.name}_{name}"
            fine_tunings.setdefault(task.name, {})[name] = fine_tune_on(
                model_dir, own, tuned_dir, data, chosen, cfg, key=key, resume=resume, progress_fn=progress_fn,
                train_runner=train_runner)
            fine_tuning_sets.setdefault(task.name, {})[name] = chosen
            tuned_model, tuned_tok, _, tuned_meta = load_aligned(tuned_dir, device)
            scoring.protocol(name, tuned_model, tuned_tok, tuned_meta.get("prompt_format", "plain"), [])
            del tuned_model
        metrics[task.name], predictions[task.name] = scoring.finish()
    for name, reason in skipped.items():  # an external cohort's "test split" is the whole cohort
        metrics[name] = {"skipped": reason.replace("the test split", "the external cohort") if external else reason}
    descriptions = describe_examples(model, tokenizer, cache, corpus, meta, sorted(test_pheno.index), examples,
                                     max_new_tokens, device, seed, external)
    info = {"model": str(model_dir.resolve()), "corpus": str(corpus), "corpus_fingerprint": fingerprint,
            "evaluation": "external" if external else "internal", "lineage_check": check,
            "stage": meta.get("stage"), "atlas": meta.get("atlas"), "shots": list(shots), "seed": seed,
            "max_test": max_test, "prompt_format": fmt, "in_tuning_mix": mix, "in_context_examples": used_shots,
            "shot_order": "seeded random order per test scan", "train_n": list(train_n), "tuned": tuned,
            "tuned_epochs": tuned_epochs if tuned else None, "fine_tunings": fine_tunings,
            "fine_tuning_sets": fine_tuning_sets,
            "regression_decoding": regression, "temperature_scaling": temperature,
            "test_subjects": len(test_subjects), "test_scans": len(test_pheno)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default) + "\n")
    (out / "predictions.json").write_text(json.dumps(predictions, default=_json_default) + "\n")
    (out / "eval.json").write_text(json.dumps(info | {"descriptions": descriptions}, indent=1,
                                              default=_json_default) + "\n")
    if report:
        from evaluation.report import write_report

        write_report(out / "report.html", metrics, predictions, descriptions, info)
    if (model_dir / CARD).is_file() and not external:  # the card carries the figures of its own test split
        add_figures(model_dir, card_figures(metrics), f"`fmrilm eval` into {out.resolve()} (test split of {corpus}, "
                    f"corpus splits {fingerprint['splits_sha256']}; {len(test_subjects)} subjects)")
    return metrics


def card_figures(metrics: dict) -> list[dict]:
    """The model card's rows: per task and model protocol, the headline figure (AUC or MAE) with its interval beside
    the FC baseline's and the paired difference."""
    rows = []
    for task, entry in metrics.items():
        if "skipped" in entry:
            continue
        metric = HEADLINE[entry["kind"]]
        fc = entry.get("fc_baseline", {})
        for protocol in protocols(entry):
            figures = entry[protocol]
            if protocol in BASELINES or "ci" not in figures:
                continue
            diff = figures.get("vs_fc_baseline", {}).get(metric, {})
            rows.append({"task": task, "protocol": protocol, "metric": metric,
                         "value": figures.get(metric), "ci": figures["ci"].get(metric), "baseline": "fc_baseline",
                         "baseline_value": fc.get(metric), "baseline_ci": fc.get("ci", {}).get(metric),
                         "diff": diff.get("diff"), "diff_ci": diff.get("ci"),
                         "n": None if figures.get("n") is None else int(figures["n"])})
    return rows


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value))


@torch.no_grad()
def describe_examples(model, tokenizer, cache: ScanCache, corpus: Path, meta: dict, test_keys: list[str], n: int,
                      max_new_tokens: int, device, seed: int, external: bool = False) -> list[dict]:
    """Generated descriptions of `n` test scans (the folder's caption prompt) next to their true captions."""
    from llm_train.evaluate import generate

    if n <= 0 or not test_keys:
        return []
    keys = sorted(random.Random(f"{seed}-describe").sample(test_keys, min(n, len(test_keys))))
    prompt = question_ids(tokenizer, meta.get("prompt") or "Describe this scan.", meta.get("prompt_format", "plain"))
    ids = generate(model, _to(cache.scans(keys), device), prompt, max_new_tokens, tokenizer.eos_token_id)
    captions = {}
    for split in (("train", "val", "test") if external else ("test",)):
        captions.update(read_captions(corpus, split))
    return [{"key": key, "generated": tokenizer.decode(i, skip_special_tokens=True).strip(),
             "true": captions.get(key, "")} for key, i in zip(keys, ids)]


def metrics_table(metrics: dict) -> str:
    """The terminal table (about 110 columns; its columns as wide as their widest cell): one line per task x protocol
    (baselines included): the headline figure (AUC / MAE) and the second one (balanced accuracy / r) with their 95 %
    intervals where metrics.json has them, the headline's difference from the FC baseline with its paired interval,
    and the ECE (classification) or the misses (regression)."""
    from evaluation.metrics import FC, HEADLINE, SECONDARY, protocols

    short = {"balanced_accuracy": "bal_acc"}

    def fig(figures: dict, metric: str) -> str:
        v = figures.get(metric)
        if not isinstance(v, (int, float)):
            return ""
        ci = (figures.get("ci") or {}).get(metric, "absent")
        interval = "" if ci == "absent" else " [n/a]" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        return f"{short.get(metric, metric)} {v:.3f}{interval}"

    def diff(figures: dict, metric: str) -> str:
        d = (figures.get("vs_fc_baseline") or {}).get(metric)
        if not isinstance(d, dict):
            return ""
        ci = d.get("ci")
        return f"{d['diff']:+.3f}" + (" [n/a]" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")

    head = ("task", "protocol", "headline [95% CI]", "second [95% CI]", f"vs {FC} [95% CI]", "other")
    rows: list[tuple[str, ...]] = []
    skipped: list[str] = []
    for task, entry in metrics.items():
        if "skipped" in entry:
            skipped.append(f"{task}  skipped: {entry['skipped']}")
            continue
        kind = entry.get("kind", "classification")
        for protocol in protocols(entry):
            figures = entry[protocol]
            other = figures.get("ece" if kind == "classification" else "misses")
            extra = "" if not isinstance(other, (int, float)) else (
                f"ece {other:.3f}" if kind == "classification" else f"misses {other:.0f}")
            rows.append((task, protocol, fig(figures, HEADLINE[kind]), fig(figures, SECONDARY[kind]),
                         diff(figures, HEADLINE[kind]), extra))
    widths = [max(len(r[i]) for r in [head] + rows) + 2 for i in range(len(head) - 1)]  # columns as wide as needed
    lines = ["".join(c.ljust(w) for c, w in zip(r, widths)) + r[-1] for r in [head] + rows]
    return "\n".join(line.rstrip() for line in lines + skipped)


def new_test_scans(corpus: Path, since: int | None) -> dict | None:
    """The test scans a `corpus add` brought after version `since` (the model's), or None when the corpus is the
    version the model was trained on: {"since_version", "scans", "subjects", "keys"}."""
    if since is None:
        return None
    manifest = read_manifest(corpus)
    new = manifest[(manifest["status"] == "ok") & (manifest["split"] == "test") & (manifest["version"] > since)]
    return {"since_version": since, "scans": len(new),
            "subjects": len(set(zip(new["dataset"], new["subject"]))), "keys": sorted(new["key"])}
