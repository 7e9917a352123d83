"""The evaluation protocols of `fmrilm eval`, one task at a time: which train scans a protocol may use, how the
model's answers become predictions, and the fine-tunings of `train_n_<n>` / `tuned` keyed by what they were made
from.

    choose_shots      k class-balanced train scans as in-context examples (train subjects only, checked)
    shot_orders       the seeded order of those examples for each test scan (the positive one is not always last)
    ScanCache         ROI series and brain tokens of a corpus's scans, read and encoded once
    classify          log-odds of class 1 per scan: the option log-likelihood difference (summed, and per token)
    regress           a number per scan: constrained greedy decoding or the expectation over a grid of values;
                      a miss (no parseable number) takes a declared fallback and is counted
    fine_tune_on      the folder instruction-tuned on a task's train scans, into a folder keyed by its inputs

Scoring reports scans scored / total through `progress_fn(stage, total, start, rank)` (the runtime's progress hook),
so a long evaluation is never silent.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from corpus_builder.instructions import canonical_answers
from corpus_builder.readers import open_zarr
from evaluation.tasks import TaskData
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import folder_digest
from llm_train.data import encode_scans
from llm_train.scoring import (
    Shot,
    decode_numbers,
    expected_values,
    log_odds,
    numeric_token_ids,
    option_scores,
    parse_number,
    shot_prefix,
    shot_text,
)

FINE_TUNE_RECORD = "fine_tune.json"  # in a fine-tuning's folder: what it was made from (its key)


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


def shot_orders(chosen: list[str], test_keys: list[str], seed: int, task: str) -> dict[tuple, list[int]]:
    """{order of the examples: the positions of the test scans asked with it}: each test scan gets its own seeded
    random order, so a class never always sits last (recency bias); scans sharing an order share one cached
    prefix."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(test_keys):
        order = list(chosen)
        random.Random(f"{seed}-{task}-order-{key}").shuffle(order)
        groups.setdefault(tuple(order), []).append(i)
    return groups


class ScanCache:
    """ROI series, codes (and features) of a corpus's scans, read once."""

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


def make_shot(tokenizer, fmt: str, data: TaskData, shot_cache: ScanCache, key: str) -> Shot:
    """The train scan `key` as an in-context example: its scan and `question answer end`."""
    scan = {n: v[0] for n, v in shot_cache.scans([key]).items()}
    return Shot(scan, shot_text(tokenizer, data.task.question, answer_text(data, data.train[key]), fmt))


class Asker:
    """One model asked one task's question about many scans, with in-context examples from `shot_cache` (the train
    corpus) in each test scan's own order; reports progress per scan."""

    def __init__(self, model, tokenizer, fmt: str, data: TaskData, cache: ScanCache, shot_cache: ScanCache,
                 shots: list[str], batch_size: int, device, seed: int, progress=None):
        self.model, self.tokenizer, self.fmt, self.data = model, tokenizer, fmt, data
        self.cache, self.shot_cache, self.shots = cache, shot_cache, shots
        self.batch_size, self.device, self.seed, self.progress = batch_size, device, seed, progress

    def _shot(self, key: str) -> Shot:
        return make_shot(self.tokenizer, self.fmt, self.data, self.shot_cache, key)

    def each(self, keys: list[str], fn) -> list:
        """fn(scans, shots, prefix) per batch of `keys` grouped by their examples' order; results in `keys` order."""
        out: list = [None] * len(keys)
        done = 0
        for order, rows in shot_orders(self.shots, keys, self.seed, self.data.task.name).items():
            shots = [self._shot(key) for key in order]
            prefix = shot_prefix(self.model, shots) if shots else None
            for i in range(0, len(rows), self.batch_size):
                part = rows[i:i + self.batch_size]
                scans = {k: v.to(self.device) for k, v in self.cache.scans([keys[r] for r in part]).items()}
                for r, value in zip(part, fn(scans, shots, prefix)):
                    out[r] = value
                done += len(part)
                if self.progress is not None:
                    self.progress.update(done)
        return out

    def classify(self, keys: list[str]) -> dict[str, np.ndarray]:
        """{'logodds': summed log-likelihood difference of option 1 over option 0, 'logodds_per_token': the same
        per option token} per scan."""
        options = list(self.data.task.options)

        def fn(scans, shots, prefix):
            scores = option_scores(self.model, self.tokenizer, scans, self.data.task.question, options, shots,
                                   self.fmt, prefix=prefix)
            return list(zip(log_odds(scores), log_odds(scores, "mean")))

        pairs = self.each(keys, fn)
        return {"logodds": np.array([p[0] for p in pairs], float),
                "logodds_per_token": np.array([p[1] for p in pairs], float)}

    def regress(self, keys: list[str], mode: str, grid: np.ndarray | None = None) -> list:
        """A value per scan ('greedy': the parsed decoded number, None when it does not parse; 'expected': the
        probability-weighted mean over `grid`, answers rendered as the corpus writes them) and the raw texts."""
        task = self.data.task
        if mode == "expected":
            render = lambda v: canonical_answers({task.attribute: float(v)})[task.attribute]  # noqa: E731

            def fn(scans, shots, prefix):
                values = expected_values(self.model, self.tokenizer, scans, task.question, list(grid), shots,
                                         self.fmt, prefix=prefix, render=render)
                return [(float(v), f"{v:.2f}") for v in values]
        else:
            numeric = numeric_token_ids(self.tokenizer)

            def fn(scans, shots, prefix):
                texts = decode_numbers(self.model, self.tokenizer, scans, task.question, shots, self.fmt,
                                       numeric=numeric, prefix=prefix)
                return [(parse_number(t), t) for t in texts]

        return self.each(keys, fn)


def value_grid(train_values: np.ndarray, size: int = 25) -> np.ndarray:
    """The values scored in expected-value decoding: `size` quantiles of the train split's values, as the corpus
    answers them (age in whole years, a score to one decimal), duplicates dropped."""
    q = np.quantile(np.asarray(train_values, float), np.linspace(0, 1, size))
    return np.unique(np.round(q, 1))


def with_fallback(values: list, fallback: float) -> tuple[np.ndarray, int]:
    """(values with every miss replaced by `fallback`, the number of misses): MAE, r and R^2 then cover every test
    scan, the same scans as the baselines'."""
    misses = [v is None or not math.isfinite(v) for v in values]
    return np.array([fallback if m else v for v, m in zip(values, misses)], float), int(sum(misses))


def progress_for(progress_fn, stage: str, total: int):
    return nullcontext(None) if progress_fn is None else progress_fn(stage, total, 0, 0)


def tuned_steps(n_examples: int, epochs: float, batch_size: int) -> int:
    """Steps of `epochs` passes over `n_examples` at `batch_size` (at least one step)."""
    return max(1, math.ceil(epochs * n_examples / batch_size))


def fine_tune_key(model_dir: Path, corpus: Path) -> dict:
    """What every fine-tuning of one evaluation is made from: the input folder (path and digest) and the corpus's
    split assignment. Computed once per evaluation."""
    from corpus_builder.lineage import corpus_fingerprint

    return {"model": str(Path(model_dir).resolve()), "model_digest": folder_digest(model_dir),
            "corpus_splits_sha256": corpus_fingerprint(corpus)["splits_sha256"]}


def check_fine_tunings(out: Path, key: dict) -> None:
    """With --resume, before any scoring: every fine-tuning already in `out/fine_tuned/` must have been made from
    the model folder and corpus of `key` (`fine_tune_key`; one-line error naming the first that was not)."""
    for path in sorted((out / "fine_tuned").glob(f"*/{FINE_TUNE_RECORD}")):
        record = json.loads(path.read_text())
        if any(record.get(k) != key[k] for k in ("model_digest", "corpus_splits_sha256")):
            raise InputError(f"{path.parent}: holds a fine-tuning made from {record.get('model')} (digest "
                             f"{record.get('model_digest')}), not of {key['model']} (digest {key['model_digest']}) "
                             "on this corpus; remove it or run without --resume to redo it")


def fine_tune_on(model_dir: Path, corpus: Path, out: Path, data: TaskData, keys: list[str], cfg, *,
                 key: dict | None = None, resume: bool = False, progress_fn=None, train_runner=None) -> dict:
    """The paper's few-shot / tuned protocols: instruction-tune the folder on the task's question for the train
    scans `keys` only (`llm_train.instruct.train`, stage 3's loop), into `out`. `train_runner(train_fn, cfg, inputs,
    name)` runs that training (e.g. on Ray Train workers: `cluster.launch.run_training`, checkpoints and storage
    under `out`); None runs it in-process with a `LocalRuntime` (checkpoints in `out/checkpoints`), its steps
    reported through `progress_fn`.

    The folder is keyed by what it is made from (the input folder's content, the corpus's split assignment, the
    examples, the config; `key` from `fine_tune_key`, computed here when not given): an `out` made from anything
    else is removed and made afresh, or, with `resume`, refused in one line, so another model's fine-tuning can
    never be scored. Returns the record of the run (its key and how
    many examples it saw)."""
    from fmrilm_core.runtime import LocalRuntime
    from llm_train.config import InstructConfig
    from llm_train.instruct import InstructInputs
    from llm_train.instruct import train as train_instruct

    cfg = cfg if cfg is not None else InstructConfig(steps=20, checkpoint_every=20, eval_every=20, eval_items=4)
    items = tuple((k, ({"role": "user", "content": data.task.question},
                       {"role": "assistant", "content": answer_text(data, data.train[k])})) for k in keys)
    record = {**(key or fine_tune_key(model_dir, corpus)), "task": data.task.name, "keys": list(keys),
              "config": cfg.model_dump(mode="json"),
              "examples_seen": cfg.steps * cfg.batch_size, "steps": cfg.steps, "batch_size": cfg.batch_size,
              "train_scans": len(keys), "epochs": round(cfg.steps * cfg.batch_size / max(1, len(keys)), 3)}
    key_file = out / FINE_TUNE_RECORD
    if out.exists():
        previous = json.loads(key_file.read_text()) if key_file.is_file() else None
        if previous != record:
            what = "of unknown origin" if previous is None else f"made from {previous.get('model')} " \
                f"(digest {previous.get('model_digest')}) or with other examples or settings"
            if resume:
                raise InputError(f"{out}: holds a fine-tuning {what}, not of {model_dir}; remove it or run without "
                                 "--resume to start it afresh")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(record, indent=1) + "\n")
    labelled = None if progress_fn is None else (  # "eval sex_train_n_2: fine-tuning steps  12/40 ..."
        lambda stage, total, start, rank: progress_fn(f"eval {out.name}: fine-tuning steps", total, start, rank))
    inputs = InstructInputs(model_dir, corpus, out, items=items)
    if train_runner is None:
        train_instruct(cfg, inputs, LocalRuntime(out / "checkpoints", progress_fn=labelled))
    else:
        train_runner(train_instruct, cfg, inputs, f"fine_tune_{out.name}")
    return {k: v for k, v in record.items() if k not in ("config", "keys")}
