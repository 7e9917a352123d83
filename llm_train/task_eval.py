"""`fmrilm eval`: a model folder on the paper's tasks, beside the baselines, on the test split of a corpus.

    metrics = evaluate_tasks(model_dir, corpus, out, tasks=None, shots=(0, 2))

Writes (DESIGN 3.8):
    OUT/metrics.json      task -> protocol (`zero_shot`, `k_shot_<k>`, `train_n_<n>`, `tuned`) -> metric, and
                          beside them `fc_baseline` and `tokenizer_probe` on the same test scans; a skipped task is
                          {"skipped": reason}
    OUT/predictions.json  every test scan's label and prediction per task and protocol (what the figures show)
    OUT/eval.json         the run: model, corpus, atlas, shots asked, the train scans used as examples per task and k,
                          and the fine-tuning sets per task and protocol
    OUT/fine_tuned/       the folders fine-tuned for `train_n_<n>` and `tuned`
    OUT/report.html       self-contained report (`llm_train.report`)

Protocols built here: `zero_shot` (no examples: with a stage-2 folder this is the aligned model asked directly) and
`k_shot_<k>` (k examples in context, drawn from the TRAIN split only, class-balanced for a classification; the test
scan's subject can never be among them, and a draw that would hold a test subject raises), and `train_n_<n>` (the
paper's few-shot: the folder instruction-tuned on the task's question for n class-balanced train subjects, one scan
each, drawn like the in-context examples, then asked with no examples) and `tuned` (the same on every labelled train
scan of the task: single-task full tuning). A stage-3 folder of `fmrilm llm instruct` is itself multi-task tuned:
its `zero_shot` figure is the multi-task figure for a task in its tuning mix (`in_tuning_mix`), and a true zero-shot
one for a task left out of it.

Everything is scored on the scans of the test split (subject-level splits: no test subject has a train scan).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from corpus_builder.instructions import canonical_answers
from corpus_builder.readers import open_zarr, read_captions, read_phenotypes
from fmrilm_core.errors import InputError
from llm_train.baselines import fc_features, fit_predict, probe_features
from llm_train.data import encode_scans
from llm_train.export import atlas_signature, load_aligned, read_meta
from llm_train.scoring import (
    Shot,
    answer_ids,
    check_context,
    classification_metrics,
    decode_numbers,
    numeric_token_ids,
    option_probabilities,
    parse_number,
    question_ids,
    regression_metrics,
    shot_text,
)
from llm_train.tasks import TaskData, select_tasks

BASELINES = ("fc_baseline", "tokenizer_probe")


def protocol_name(k: int) -> str:
    return "zero_shot" if k == 0 else f"k_shot_{k}"


def check_atlas(model_dir: Path, corpus: Path) -> dict:
    """The model folder's brain.json; one-line error when its atlas is not the corpus's."""
    meta = read_meta(model_dir)
    ours, theirs = atlas_signature(corpus), meta.get("atlas") or {}
    if theirs.get("labels_sha256") != ours["labels_sha256"]:
        raise InputError(f"{model_dir}: its brain tokenizer reads another atlas (N={theirs.get('n_rois')}, labels "
                         f"{theirs.get('labels_sha256')}) than the corpus {corpus} (N={ours['n_rois']}, labels "
                         f"{ours['labels_sha256']})")
    return meta


def answer_text(data: TaskData, label) -> str:
    """The canonical answer of a label: an option for a classification, the corpus's answer for a value."""
    task = data.task
    if task.kind == "classification":
        return task.options[int(label)]
    return canonical_answers({task.attribute: float(label)})[task.attribute]


def choose_shots(data: TaskData, train_pheno: pd.DataFrame, test_subjects: set, k: int, seed: int) -> list[str]:
    """k train scans as in-context examples: class-balanced (round-robin over the classes) for a classification,
    drawn at random for a regression; one scan per subject. Raises if a chosen scan is not a train scan or belongs
    to a test subject (cannot happen with subject-level splits; checked because it would void the figure)."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}-{data.task.name}-{k}")
    labels = data.train
    keys = sorted(labels.index)
    rng.shuffle(keys)
    if data.task.kind == "classification":
        pools = [[key for key in keys if labels[key] == c] for c in range(len(data.task.options))]
    else:
        pools = [keys]
    chosen, used, i = [], set(), 0
    while len(chosen) < k and any(pools):
        pool = pools[i % len(pools)]
        i += 1
        while pool:
            key = pool.pop(0)
            subject = train_pheno.at[key, "subject"]
            if subject not in used:
                chosen.append(key)
                used.add(subject)
                break
    if len(chosen) < k:
        raise InputError(f"{data.task.name}: {k} shots asked, the train split has {len(chosen)} usable subjects")
    bad = [key for key in chosen if key not in train_pheno.index or train_pheno.at[key, "split"] != "train"
           or train_pheno.at[key, "subject"] in test_subjects]
    if bad:
        raise RuntimeError(f"{data.task.name}: in-context examples {bad} are not train scans of train subjects")
    return chosen


class ScanCache:
    """ROI series, codes (and features) of the corpus's scans, read once."""

    def __init__(self, corpus: Path, brain_tokenizer, features: bool, connectivity=None):
        self.zarr = open_zarr(corpus)
        self.brain_tokenizer, self.features, self.connectivity = brain_tokenizer, features, connectivity
        self.x: dict[str, np.ndarray] = {}
        self.encoded: dict[str, dict[str, torch.Tensor]] = {}

    def series(self, keys: list[str]) -> np.ndarray:
        todo = [k for k in keys if k not in self.x]
        if todo:
            for key, x in zip(todo, self.zarr.batch(todo)):
                self.x[key] = np.asarray(x, np.float32)
        return np.stack([self.x[k] for k in keys])

    def scans(self, keys: list[str]) -> dict[str, torch.Tensor]:
        todo = [k for k in keys if k not in self.encoded]
        for i in range(0, len(todo), 32):
            part = todo[i:i + 32]
            out = encode_scans(self.brain_tokenizer, torch.from_numpy(self.series(part)), self.features,
                               self.connectivity)
            for j, key in enumerate(part):
                self.encoded[key] = {name: value[j] for name, value in out.items()}
        return {name: torch.stack([self.encoded[k][name] for k in keys]) for name in self.encoded[keys[0]]}


def score_task(model, tokenizer, fmt: str, data: TaskData, test_keys: list[str], y_test: np.ndarray,
               cache: ScanCache, examples: list[Shot], batch_size: int, device) -> tuple[dict, dict]:
    """(metrics, {'' : predictions[, '_text': generated numbers]}) of one model on one task's test scans."""
    task = data.task
    batches = [_to(cache.scans(test_keys[i:i + batch_size]), device) for i in range(0, len(test_keys), batch_size)]
    if task.kind == "classification":
        probs = np.concatenate([option_probabilities(model, tokenizer, b, task.question, list(task.options),
                                                     examples, fmt) for b in batches])
        return classification_metrics(y_test, probs), {"": probs[:, 1].tolist()}
    numeric = numeric_token_ids(tokenizer)
    texts = [t for b in batches for t in decode_numbers(model, tokenizer, b, task.question, examples, fmt,
                                                        numeric=numeric)]
    values = [parse_number(t) for t in texts]
    return regression_metrics(y_test, values), {"": values, "_text": texts}


def fine_tune_on(model_dir: Path, corpus: Path, out: Path, data: TaskData, keys: list[str], cfg, fmt: str,
                 progress_fn=None) -> Path:
    """The paper's few-shot protocol: instruction-tune the folder on the task's question for the N train scans
    `keys` only (`llm_train.instruct`, in-process, its steps reported through `progress_fn`), into `out`."""
    from fmrilm_core.runtime import LocalRuntime
    from llm_train.config import InstructConfig
    from llm_train.instruct import InstructInputs
    from llm_train.instruct import train as train_instruct

    cfg = cfg if cfg is not None else InstructConfig(steps=20, checkpoint_every=20, eval_every=20, eval_items=4)
    items = tuple((key, ({"role": "user", "content": data.task.question},
                         {"role": "assistant", "content": answer_text(data, data.train[key])})) for key in keys)
    labelled = None if progress_fn is None else (  # "eval sex_train_n_2: fine-tuning steps  12/40 ..."
        lambda stage, total, start, rank: progress_fn(f"eval {out.name}: fine-tuning steps", total, start, rank))
    train_instruct(cfg, InstructInputs(model_dir, corpus, out, items=items),
                   LocalRuntime(out / "checkpoints", progress_fn=labelled))
    return out


def evaluate_tasks(model_dir: Path, corpus: Path, out: Path, *, tasks: list[str] | None = None,
                   shots: tuple[int, ...] = (0,), seed: int = 0, max_test: int | None = None, batch_size: int = 8,
                   examples: int = 4, max_new_tokens: int = 96, device: str | None = None,
                   report: bool = True, train_n: tuple[int, ...] = (), tuned: bool = False,
                   instruct_cfg=None, progress_fn=None) -> dict:
    """Score the model folder and the baselines on the test split; write OUT (see the module doc); return the
    metrics. `max_test` caps the test scans per task (a seeded subset, for quick runs). `train_n`: for each N, the
    folder fine-tuned on N class-balanced train subjects (one scan each) with `instruct_cfg` (an InstructConfig;
    None = 20 steps), scored zero-shot as `train_n_<N>`; `tuned`: the same on every labelled train scan of the
    task, scored as `tuned`. The fine-tuned folders land in OUT/fine_tuned/; their training steps are reported
    through `progress_fn(stage, total, start, rank)` (the runtime's progress hook; silent without one)."""
    model_dir, corpus, out = Path(model_dir), Path(corpus), Path(out)
    shots = tuple(sorted(set(int(k) for k in shots)))
    if any(k < 0 for k in shots):
        raise InputError(f"--shots: counts must be >= 0, got {list(shots)}")
    meta = check_atlas(model_dir, corpus)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_pheno, test_pheno = read_phenotypes(corpus, "train"), read_phenotypes(corpus, "test")
    if test_pheno.empty:
        raise InputError(f"{corpus}: the test split has no scans")
    try:
        runnable, skipped = select_tasks(tasks, train_pheno, test_pheno)
    except ValueError as err:
        raise InputError(str(err)) from None
    model, tokenizer, brain_tokenizer, meta = load_aligned(model_dir, device)
    fmt = meta.get("prompt_format", "plain")
    cache = ScanCache(corpus, brain_tokenizer, meta["input_mode"] == "features", model.connectivity)
    test_subjects = set(test_pheno["subject"])
    metrics: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    used_shots: dict[str, dict] = {}
    used_train_n: dict[str, dict] = {}
    train_n = tuple(sorted(set(int(n) for n in train_n)))
    if any(n < 1 for n in train_n):
        raise InputError(f"--train-n: counts must be >= 1, got {list(train_n)}")
    for data in runnable:
        task = data.task
        test_keys = sorted(data.test.index)
        if max_test is not None and len(test_keys) > max_test:
            test_keys = sorted(random.Random(f"{seed}-{task.name}").sample(test_keys, max_test))
        y_test = data.test[test_keys].to_numpy()
        classification = task.kind == "classification"
        entry: dict = {"kind": task.kind, "question": task.question, "n_train": len(data.train),
                       "n_test": len(test_keys)}
        if classification:
            entry["options"] = list(task.options)
        if "instruct" in meta:  # zero-shot in the paper's sense only for an attribute left out of the tuning mix
            entry["in_tuning_mix"] = task.attribute not in meta["instruct"].get("exclude_attributes", [])
        preds: dict = {"keys": test_keys, "y": y_test.tolist()}
        q = question_ids(tokenizer, task.question, fmt)
        longest = (max(len(answer_ids(tokenizer, o)) for o in task.options) + 1 if classification else 4)
        for k in shots:
            chosen = choose_shots(data, train_pheno, test_subjects, k, seed)
            used_shots.setdefault(task.name, {})[str(k)] = chosen
            examples_k = [Shot({n: v[0] for n, v in cache.scans([key]).items()},
                               shot_text(tokenizer, task.question, answer_text(data, data.train[key]), fmt))
                          for key in chosen]
            check_context(model, examples_k, q, longest)
            name = protocol_name(k)
            entry[name], preds_k = score_task(model, tokenizer, fmt, data, test_keys, y_test, cache, examples_k,
                                              batch_size, device)
            preds.update({name + suffix: v for suffix, v in preds_k.items()})
        train_keys = sorted(data.train.index)  # every train scan with the task's label
        fine_tunes = {f"train_n_{n}": choose_shots(data, train_pheno, test_subjects, n, seed) for n in train_n}
        if tuned:  # fully tuned: every labelled train scan
            fine_tunes["tuned"] = train_keys
        for name, chosen in fine_tunes.items():
            used_train_n.setdefault(task.name, {})[name] = chosen
            tuned_dir = fine_tune_on(model_dir, corpus, out / "fine_tuned" / f"{task.name}_{name}", data, chosen,
                                     instruct_cfg, fmt, progress_fn)
            tuned_model, tuned_tok, _, tuned_meta = load_aligned(tuned_dir, device)
            entry[name], preds_n = score_task(tuned_model, tuned_tok, tuned_meta.get("prompt_format", "plain"), data,
                                              test_keys, y_test, cache, [], batch_size, device)
            preds.update({name + suffix: v for suffix, v in preds_n.items()})
            del tuned_model
        groups = train_pheno.loc[train_keys, "subject"].astype(str).to_numpy()
        y_train = data.train[train_keys].to_numpy()
        for base, features in (("fc_baseline", lambda ks: fc_features(cache.series(ks))),
                               ("tokenizer_probe", lambda ks: probe_features(brain_tokenizer, cache.series(ks)))):
            pred, chosen_reg = fit_predict(features(train_keys), y_train, groups, features(test_keys),
                                           classification, seed)
            entry[base] = (classification_metrics(y_test, pred) if classification else
                           regression_metrics(y_test, [float(v) for v in pred]))
            entry[base]["regularisation"] = chosen_reg
            preds[base] = [float(v) for v in pred]
        metrics[task.name] = entry
        predictions[task.name] = preds
    for name, reason in skipped.items():
        metrics[name] = {"skipped": reason}
    descriptions = describe_examples(model, tokenizer, cache, corpus, meta, sorted(test_pheno.index), examples,
                                     max_new_tokens, device, seed)
    info = {"model": str(model_dir.resolve()), "corpus": str(corpus), "stage": meta.get("stage"),
            "atlas": meta.get("atlas"), "shots": list(shots), "seed": seed, "max_test": max_test,
            "prompt_format": fmt, "in_context_examples": used_shots,
            "train_n": list(train_n), "tuned": tuned, "fine_tuning_sets": used_train_n,
            "test_subjects": len(test_subjects), "test_scans": len(test_pheno)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default) + "\n")
    (out / "predictions.json").write_text(json.dumps(predictions, default=_json_default) + "\n")
    (out / "eval.json").write_text(json.dumps(info | {"descriptions": descriptions}, indent=1) + "\n")
    if report:
        from llm_train.report import write_report

        write_report(out / "report.html", metrics, predictions, descriptions, info)
    return metrics


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value))


@torch.no_grad()
def describe_examples(model, tokenizer, cache: ScanCache, corpus: Path, meta: dict, test_keys: list[str], n: int,
                      max_new_tokens: int, device, seed: int) -> list[dict]:
    """Generated descriptions of `n` test scans (the folder's caption prompt) next to their true captions."""
    from llm_train.evaluate import generate

    if n <= 0 or not test_keys:
        return []
    keys = sorted(random.Random(f"{seed}-describe").sample(test_keys, min(n, len(test_keys))))
    prompt = question_ids(tokenizer, meta.get("prompt") or "Describe this scan.", meta.get("prompt_format", "plain"))
    ids = generate(model, _to(cache.scans(keys), device), prompt, max_new_tokens, tokenizer.eos_token_id)
    captions = read_captions(corpus, "test")
    return [{"key": key, "generated": tokenizer.decode(i, skip_special_tokens=True).strip(),
             "true": captions.get(key, "")} for key, i in zip(keys, ids)]


def metrics_table(metrics: dict) -> str:
    """The terminal table (about 110 columns; its columns as wide as their widest cell): one line per task x protocol
    (baselines included): the headline figure (AUC / MAE) and the second one (balanced accuracy / r) with their 95 %
    intervals where metrics.json has them, the headline's difference from the FC baseline with its paired interval,
    and the ECE (classification) or the misses (regression)."""
    from llm_train.metrics import FC, HEADLINE, SECONDARY, protocols

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
