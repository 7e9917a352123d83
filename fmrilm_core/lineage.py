"""The data lineage of a saved model: which corpus each stage that made it was trained on, and whom it saw.

Every saved model folder (the brain-tokenizer export, the stage-2 and stage-3 folders, eval's fine-tunings) holds a
`lineage.json` (docs/design.md):

    {"format": "fmrilm-lineage", "version": 1, "stage": "align",
     "corpus": {<corpus_builder.lineage.corpus_fingerprint>},
     "trained_subjects": ["UKB-3fa9c1d2e4b6", ...],   # pseudonymous subjects whose scans the stage learnt from
     "parent": {<the input model's lineage.json>} | null}

so a folder carries the whole chain (stage 3 -> stage 2 -> tokenizer) and needs no other file to be checked. Before
a model is evaluated or asked about a corpus's scans, `check_corpus` walks the chain: a test subject that any stage
trained on is a one-line error naming the stage. Subjects are comparable only between corpora of the same pseudonym
scheme; an "external" evaluation (a cohort that shares no subject with the lineage) says so and is checked as far
as the schemes allow. This module reads and writes the record only; the corpus side lives in
`corpus_builder.lineage`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fmrilm_core.errors import InputError

LINEAGE = "lineage.json"
FORMAT = "fmrilm-lineage"
VERSION = 1
STAGE_NAMES = {"tokenizer": "stage 1 (brain tokenizer)", "align": "stage 2 (alignment)",
               "instruct": "stage 3 (instruction tuning)", "fine_tune": "eval fine-tuning"}


def make_lineage(stage: str, corpus: dict, trained_subjects, parent: dict | None) -> dict:
    return {"format": FORMAT, "version": VERSION, "stage": stage, "corpus": corpus,
            "trained_subjects": sorted(set(trained_subjects)), "parent": parent}


def write_lineage(folder: str | Path, lineage: dict) -> Path:
    """Write `folder/lineage.json` atomically."""
    path = Path(folder) / LINEAGE
    tmp = path.with_name(f".{LINEAGE}.tmp")
    tmp.write_text(json.dumps(lineage, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_lineage(folder: str | Path) -> dict:
    """The folder's lineage; a one-line error for a folder saved before lineage was recorded."""
    path = Path(folder) / LINEAGE
    if not path.is_file():
        raise InputError(f"{folder}: saved before models recorded their training data (no {LINEAGE}); retrain it "
                         "with this version so its figures can be checked against its training subjects")
    lineage = json.loads(path.read_text())
    if lineage.get("format") != FORMAT or lineage.get("version") != VERSION:
        raise InputError(f"{path}: not an {FORMAT} version {VERSION} record")
    return lineage


def chain(lineage: dict | None) -> list[dict]:
    """The stages of a lineage, newest first."""
    out = []
    while isinstance(lineage, dict):
        out.append(lineage)
        lineage = lineage.get("parent")
    return out


def summary(lineage: dict) -> list[dict]:
    """The chain without its subject lists (what eval.json and a model card record): stage, corpus, count."""
    return [{"stage": s["stage"], "corpus": s["corpus"], "trained_subjects": len(s.get("trained_subjects", []))}
            for s in chain(lineage)]


def check_subjects(lineage: dict, corpus: dict, subjects: set[str], what: str) -> list[str]:
    """Raise InputError when a subject of `subjects` (of the corpus fingerprinted `corpus`, e.g. its test split) was
    a training subject of any stage of `lineage` whose corpus used the same pseudonym scheme; return the stages
    whose subjects could not be compared (another scheme: the subjects are other people only if the lab says so)."""
    incomparable = []
    for stage in chain(lineage):
        if stage["corpus"].get("pseudonym_scheme") != corpus.get("pseudonym_scheme"):
            incomparable.append(stage["stage"])
            continue
        seen = subjects & set(stage.get("trained_subjects", []))
        if seen:
            raise InputError(f"{corpus.get('path')}: {len(seen)} of its {len(subjects)} {what} subjects were training "
                             f"subjects of {STAGE_NAMES.get(stage['stage'], stage['stage'])} (trained on "
                             f"{stage['corpus'].get('path')}); evaluate on the corpus the model was trained on, or "
                             "on a cohort that shares no subject with it (--external)")
    return incomparable


def grown_from(own: dict, corpus: dict) -> bool:
    """Whether `corpus` (a fingerprint) is the corpus `own` fingerprinted, as it was then or grown since by `corpus
    add`: the key -> split assignment of its scans as of `own`'s version is exactly `own`'s."""
    if own.get("splits_sha256") == corpus.get("splits_sha256"):
        return True
    version = own.get("version", 1)
    return (own.get("pseudonym_scheme") == corpus.get("pseudonym_scheme")
            and (corpus.get("splits_sha256_by_version") or {}).get(str(version)) == own.get("splits_sha256"))


def new_since(own: dict, corpus: dict) -> int | None:
    """The version of `corpus` after which its scans are new to a model trained on `own` (None: the same version)."""
    if not grown_from(own, corpus) or corpus.get("version", 1) == own.get("version", 1):
        return None
    return int(own.get("version", 1))


def check_corpus(lineage: dict, corpus: dict, test_subjects: set[str], external: bool = False) -> dict:
    """The check `fmrilm eval` and `fmrilm ask` make before scoring: returns what eval.json records of it.

    Not external: the corpus must be the one the model was last trained on (same key -> split assignment and
    pseudonym scheme; a rebuild with another seed, split fractions or secret is refused) and no test subject may be
    a training subject of any stage. External: every scan of the corpus is a test scan; no subject of it may be a
    training subject of a stage of the same pseudonym scheme."""
    own = lineage["corpus"]
    if not external:
        for field, name in (("pseudonym_scheme", "pseudonym scheme"), ("splits_sha256", "key -> split assignment")):
            if field == "splits_sha256" and grown_from(own, corpus):
                continue
            if own.get(field) != corpus.get(field):
                raise InputError(f"{corpus.get('path')}: its {name} ({corpus.get(field)}) is not the one the model "
                                 f"was trained on ({own.get(field)}, {own.get('path')}); evaluate on that corpus, or "
                                 "pass --external for a cohort that shares no subject with the model's training data")
    incomparable = check_subjects(lineage, corpus, test_subjects, "evaluated" if external else "test")
    return {"external": external, "corpus": corpus, "lineage": summary(lineage),
            "subjects_checked": len(test_subjects), "stages_not_comparable": incomparable}


def folder_digest(folder: str | Path, skip: tuple[str, ...] = ("README.md",)) -> str:
    """A model folder's identity, cheaply (as the corpus build's source fingerprint): path, size and modification
    time of every file, the model card left out (eval writes its figures into it) and checkpoints too. A fine-tuning
    made from one model is then never resumed or scored for another at the same path, and no weight file is read."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip
                       and "checkpoints" not in p.relative_to(root).parts):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
