"""Extracted series -> splits, reference fits, the 23 descriptors with z-values, captions and instructions.

Reads the output of `corpus_builder.extraction` and writes beside it (into `out`):

    OUT/descriptors.parquet   one row per ok scan: key, split, the 23 raw values, `z_<name>`, the 28 pairs
                              (`pair_<a>-<b>`, `pairz_<a>-<b>`), `missing` (JSON name -> reason)
    OUT/captions.jsonl        {"key", "caption", "qa"} per ok scan (qa = instruction items, stage 3 only)
    OUT/norms.json            reference-cohort mean / std of every descriptor and pair, cohort name and count
    OUT/reference.npz         group-ICA maps, reference gradients, ROI networks
    OUT/splits.parquet        key, subject, split (subject-level)

The reference cohort is the training split of `reference.dataset` (every dataset when null): its scans fit
the group ICA, the gradient template and the norms, so validation and test scans never shape their own
z-scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import zarr

from corpus_builder.captions import caption_for
from corpus_builder.config import CorpusConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES, compute_descriptors
from corpus_builder.errors import InputError
from corpus_builder.instructions import instruction_items
from corpus_builder.norms import Norms, fit_reference, save_reference
from corpus_builder.records import PHENOTYPES
from corpus_builder.splits import assign_splits


def load_extracted(ts_dir: Path) -> tuple[pd.DataFrame, zarr.Array, pd.DataFrame]:
    """(ok scans with their zarr index, the ts array, the ROI table) of an extraction folder."""
    for name in ("scans.parquet", "timeseries.zarr", "rois.tsv"):
        if not (ts_dir / name).exists():
            raise InputError(f"{ts_dir}: not an extracted corpus (no {name})")
    scans = pd.read_parquet(ts_dir / "scans.parquet")
    ok = scans[scans["status"] == "ok"].sort_values("index").reset_index(drop=True)
    ts = zarr.open_group(ts_dir / "timeseries.zarr", mode="r")["ts"]
    return ok, ts, pd.read_csv(ts_dir / "rois.tsv", sep="\t")


def count_ok_scans(ts_dir: Path) -> int:
    return len(load_extracted(ts_dir)[0])


def reference_cohort(scans: pd.DataFrame, dataset: str | None) -> pd.DataFrame:
    ref = scans[scans["split"] == "train"]
    if dataset is not None:
        ref = ref[ref["dataset"] == dataset]
    if len(ref) < 2:
        where = f"dataset {dataset!r}" if dataset else "the corpus"
        raise InputError(f"reference cohort (train split of {where}) has {len(ref)} scans; need at least 2")
    return ref


def describe(ts_dir: Path, cfg: CorpusConfig, out: Path, seed: int = 0, progress=None) -> dict:
    ok, ts, rois = load_extracted(ts_dir)
    if ok.empty:
        raise InputError(f"{ts_dir}: no usable scan to describe")
    out.mkdir(parents=True, exist_ok=True)
    ok["split"] = assign_splits(ok, tuple(cfg.splits.fractions), seed)
    ok[["key", "subject", "dataset", "split"]].to_parquet(out / "splits.parquet", index=False)

    ref_rows = reference_cohort(ok, cfg.reference.dataset)
    fit_rows = ref_rows.sample(n=min(len(ref_rows), cfg.reference.max_fit_scans), random_state=seed)
    reference = fit_reference([ts[int(i)] for i in fit_rows["index"]], rois["network"].to_numpy(),
                              cfg.descriptors, seed)
    save_reference(reference, out / "reference.npz")

    descs = []
    for i in ok["index"]:
        descs.append(compute_descriptors(ts[int(i)], reference, cfg.source.cleaning.tr))
        if progress is not None:
            progress(1)
    ref_positions = ok.index[ok["key"].isin(ref_rows["key"])]
    cohort = f"{cfg.reference.dataset or 'all'}/train"
    norms = Norms.fit([descs[p] for p in ref_positions], cohort)
    norms.save(out / "norms.json")

    rows = []
    with (out / "captions.jsonl").open("w") as captions:
        for (_, scan), d in zip(ok.iterrows(), descs):
            z, pair_z = norms.z(d)
            row = {"key": scan["key"], "split": scan["split"], "missing": json.dumps(d.missing)}
            row.update(d.values)
            row.update({f"z_{n}": z[n] for n in DESCRIPTOR_NAMES})
            row.update({f"pair_{n}": d.fc_pairs[n] for n in PAIR_NAMES})
            row.update({f"pairz_{n}": pair_z[n] for n in PAIR_NAMES})
            rows.append(row)
            scan_seed = _scan_seed(seed, scan["key"])
            text = caption_for(z, pair_z, d.missing, cfg.captions, scan_seed, d.values)
            phenotypes = {p: scan[p] for p in PHENOTYPES if p in scan and pd.notna(scan[p])}
            qa = instruction_items(phenotypes, text, scan_seed, cfg.instructions)
            captions.write(json.dumps({"key": scan["key"], "caption": text, "qa": qa}) + "\n")
    pd.DataFrame(rows).to_parquet(out / "descriptors.parquet", index=False)
    return {"scans": len(ok), "reference_scans": len(ref_rows), "reference_cohort": cohort,
            "splits": ok["split"].value_counts().to_dict(),
            "missing_descriptors": int(sum(len(d.missing) for d in descs))}


def _scan_seed(seed: int, key: str) -> int:
    """A per-scan seed that depends only on the key (captions do not change when other scans change)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") ^ seed
