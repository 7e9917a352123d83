"""Raw subject identifiers never reach shards, captions, instructions, the manifest, zarr or MLflow."""

import pandas as pd

from tests.conftest import raw_id_hits


def test_no_raw_subject_id_in_any_output(tiny_pipeline):
    _, result, work = tiny_pipeline
    raw_ids = pd.read_csv(work / "source" / "participants.tsv", sep="\t")["participant_id"].str.removeprefix("sub-")
    assert len(raw_ids) == 8
    corpus = work / "corpus"
    outputs = [p for p in corpus.rglob("*") if p.is_file()]
    outputs += [work / "mlflow.db"] + [p for p in (work / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in outputs) and any(p.name == "manifest.parquet" for p in outputs)
    for path in outputs:
        assert not raw_id_hits(path.read_bytes(), raw_ids), f"raw id found in {path}"
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    assert set(manifest["subject"]).isdisjoint(raw_ids)


def test_the_id_check_finds_ids_in_names_and_paths_not_inside_longer_numbers():
    assert raw_id_hits(b'{"file": "sub-1669006_ses-2.npy"}', ["1669006"]) == ["1669006"]
    assert raw_id_hits(b"/data/1669006/rest.nii.gz", ["1669006", "1000003"]) == ["1669006"]
    assert raw_id_hits(b'{"final_loss": 12.342166900634766}', ["1669006"]) == []
