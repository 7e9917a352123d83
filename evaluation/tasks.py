"""The paper's evaluation tasks, defined from a corpus's phenotypes (`corpus_builder.readers.read_phenotypes`).

    sex                  classification  Female / Male                       every scan with a sex
    age                  regression      years                               every scan with an age
    fluid_intelligence   regression      the score                           every scan with a score
    ad, adhd, asd        classification  no diagnosis / the diagnosis        controls and patients of the datasets
                                                                             where that diagnosis occurs

Answers are the corpus's own canonical answers (`corpus_builder.instructions.canonical_answers`), so a model tuned
on `qa.json` is asked in the words it was trained on. A diagnosis task compares the patients with the controls of
the datasets that hold such patients (AD vs CN inside ADNI, not AD vs the healthy children of ABCD). A task runs
only when its train split has both classes (at least 3 labelled scans for a regression) and its test split has
both classes (2 scans): otherwise it is skipped with the reason, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from corpus_builder.instructions import DIAGNOSES, NO_DIAGNOSIS, QUESTIONS, canonical_answers


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                     # "classification" | "regression"
    attribute: str                # the phenotype column and the instruction attribute
    question: str
    options: tuple[str, ...] = ()  # classification: the answer of each class; class 1 is the positive one
    diagnosis: str | None = None   # diagnosis tasks: the canonical name of the patients' diagnosis

    def labels(self, pheno: pd.DataFrame) -> pd.Series:
        """The task's label of every scan of `pheno` that takes part in it (index = scan key): the class index
        (int) for a classification, the value (float) for a regression."""
        if self.kind == "regression":
            values = pd.to_numeric(pheno[self.attribute], errors="coerce")
            return values[np.isfinite(values)].astype(float)
        if self.attribute == "sex":
            answers = pheno["sex"].map(lambda s: canonical_answers({"sex": s}).get("sex"))
        else:
            answers = pheno["diagnosis"].map(lambda d: canonical_answers({"diagnosis": d}).get("diagnosis"))
            datasets = set(pheno.loc[answers == self.diagnosis, "dataset"])
            answers = answers.where(pheno["dataset"].isin(datasets))
        index = {option: i for i, option in enumerate(self.options)}
        return answers.map(index).dropna().astype(int)


def _diagnosis(name: str, code: str) -> Task:
    full = DIAGNOSES[code.lower()]
    return Task(name, "classification", "diagnosis", QUESTIONS["diagnosis"][0], (NO_DIAGNOSIS, full), full)


TASKS: dict[str, Task] = {
    "sex": Task("sex", "classification", "sex", QUESTIONS["sex"][0], ("Female", "Male")),
    "age": Task("age", "regression", "age", QUESTIONS["age"][0]),
    "fluid_intelligence": Task("fluid_intelligence", "regression", "fluid_intelligence",
                               QUESTIONS["fluid_intelligence"][0]),
    "ad": _diagnosis("ad", "AD"),
    "adhd": _diagnosis("adhd", "ADHD"),
    "asd": _diagnosis("asd", "ASD"),
}


@dataclass
class TaskData:
    task: Task
    train: pd.Series   # label by scan key, train split
    test: pd.Series    # label by scan key, test split


def _why_not(task: Task, train: pd.Series, test: pd.Series) -> str | None:
    if len(train) == 0 and len(test) == 0:
        return f"the corpus has no {task.attribute} label" + (f" for {task.diagnosis}" if task.diagnosis else "")
    if task.kind == "regression":
        if len(train) < 3:
            return f"{len(train)} labelled train scans (needs 3)"
        if len(test) < 2:
            return f"{len(test)} labelled test scans (needs 2)"
        return None
    for split, labels in (("train", train), ("test", test)):
        missing = [task.options[c] for c in range(len(task.options)) if not (labels == c).any()]
        if missing:
            return f"the {split} split has no scan answering {' / '.join(repr(m) for m in missing)}"
    return None


def select_tasks(names: list[str] | None, train_pheno: pd.DataFrame,
                 test_pheno: pd.DataFrame) -> tuple[list[TaskData], dict[str, str]]:
    """(the tasks that can run, {name: why it is skipped}); `names` None = all six. An unknown name raises
    ValueError (the caller turns it into a one-line error)."""
    chosen = list(TASKS) if not names else list(names)
    unknown = [n for n in chosen if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    run, skipped = [], {}
    for name in chosen:
        task = TASKS[name]
        train, test = task.labels(train_pheno), task.labels(test_pheno)
        reason = _why_not(task, train, test)
        if reason is None:
            run.append(TaskData(task, train, test))
        else:
            skipped[name] = reason
    return run, skipped
