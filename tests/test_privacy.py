"""Raw subject identifiers never reach shards, captions, instructions, the manifest, zarr or MLflow."""

import pandas as pd


def test_no_raw_subject_id_in_any_output(tiny_pipeline):
    _, result, work = tiny_pipeline
    raw_ids = pd.read_csv(work / "source" / "participants.tsv", sep="\t")["participant_id"].str.removeprefix("sub-")
    assert len(raw_ids) == 8
    corpus = work / "corpus"
    outputs = [p for p in corpus.rglob("*") if p.is_file()]
    outputs += [work / "mlflow.db"] + [p for p in (work / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in outputs) and any(p.name == "manifest.parquet" for p in outputs)
    for path in outputs:
        blob = path.read_bytes()
        for rid in raw_ids:
            assert rid.encode() not in blob, f"raw id found in {path}"
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    assert set(manifest["subject"]).isdisjoint(raw_ids)
