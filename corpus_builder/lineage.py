"""Who a corpus's scans are, as a later stage needs to know it: the corpus fingerprint a saved model records and
the subjects of each split (docs/design.md).

    fingerprint = corpus_fingerprint(corpus)   # {"splits_sha256", "pseudonym_scheme", "norms_sha256", ...}
    test = split_subjects(corpus, "test")      # {"UKB-3fa9c1d2e4b6", ...}

The fingerprint changes when any scan moves to another split, when the pseudonym secret changes (then no key can
be compared with the model's) or when the norms change (then captions and descriptor z-scores mean other things).
A subject is named `<dataset>-<pseudonym>`, the prefix of its scans' keys: never a raw id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from corpus_builder.readers import read_corpus_file, read_manifest
from corpus_builder.versions import splits_sha256
from fmrilm_core.errors import InputError

COMPLETE = "complete.json"


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def _usable(corpus: str | Path):
    manifest = read_manifest(corpus)
    return manifest[manifest["status"] == "ok"]


def corpus_fingerprint(corpus: str | Path) -> dict:
    """The corpus's identity as a model folder records it (lineage.json): where it was, the hash of its key -> split
    assignment (usable scans), its version and the same hash as of each earlier version (so a model trained on
    version 1 recognises a corpus grown by `corpus add` as its own), the pseudonym scheme's fingerprint, the hash
    of norms.json, scan counts per split and per dataset, and whether it is synthetic. A corpus whose build did not
    record its pseudonym scheme (built before lineage existed) is a one-line error: rebuild it."""
    record = json.loads(read_corpus_file(corpus, COMPLETE))
    if not record.get("pseudonym_scheme"):
        raise InputError(f"{corpus}: built before corpora recorded their pseudonym scheme (no pseudonym_scheme in "
                         f"{COMPLETE}); rebuild it with `fmrilm corpus build --overwrite`")
    manifest = read_manifest(corpus)
    ok = manifest[manifest["status"] == "ok"]
    version = int(record.get("version", 1))
    by_version = {str(v): splits_sha256(manifest[manifest["version"] <= v]) for v in range(1, version + 1)}
    return {"path": str(corpus if "://" in str(corpus) else Path(corpus).resolve()),
            "splits_sha256": by_version[str(version)], "version": version,
            "splits_sha256_by_version": by_version,
            "pseudonym_scheme": record["pseudonym_scheme"],
            "norms_sha256": _sha(read_corpus_file(corpus, "norms.json")),
            "scans": {str(k): int(v) for k, v in ok["split"].value_counts().sort_index().items()},
            "datasets": {str(k): int(v) for k, v in ok["dataset"].value_counts().sort_index().items()},
            "synthetic": bool(record.get("synthetic", False))}


def subject_of(dataset: str, subject: str) -> str:
    return f"{dataset}-{subject}"


def split_subjects(corpus: str | Path, *splits: str) -> set[str]:
    """The subjects (`<dataset>-<pseudonym>`) with a usable scan in any of `splits` (all splits when none given)."""
    ok = _usable(corpus)
    if splits:
        ok = ok[ok["split"].isin(splits)]
    return {subject_of(d, s) for d, s in zip(ok["dataset"], ok["subject"])}


def subject_per_key(corpus: str | Path, keys) -> list[str]:
    """The subject (`<dataset>-<pseudonym>`) of each scan key, in order (e.g. the groups of a bootstrap)."""
    ok = _usable(corpus).set_index("key")
    keys = list(keys)
    missing = [k for k in keys if k not in ok.index]
    if missing:
        raise InputError(f"{corpus}: no usable scan with key {missing[0]!r}")
    rows = ok.loc[keys]
    return [subject_of(d, s) for d, s in zip(rows["dataset"], rows["subject"])]


def subjects_of_keys(corpus: str | Path, keys) -> set[str]:
    """The subjects of the given scan keys (e.g. the N scans of a few-shot fine-tuning)."""
    return set(subject_per_key(corpus, keys))


def stage_lineage(stage: str, corpus: str | Path, parent: dict | None, keys=None) -> dict:
    """The lineage record of a stage trained on `corpus` (its train split, or only the scans `keys`) from a model
    whose lineage is `parent`. Checked at the stage boundary: a val or test subject of this corpus that the parent's
    stages trained on is a one-line error (the held-out figures of this stage would be void)."""
    from fmrilm_core.lineage import check_subjects, make_lineage

    fingerprint = corpus_fingerprint(corpus)
    if parent is not None:
        check_subjects(parent, fingerprint, split_subjects(corpus, "val", "test"), "held-out")
    subjects = split_subjects(corpus, "train") if keys is None else subjects_of_keys(corpus, keys)
    return make_lineage(stage, fingerprint, subjects, parent)
