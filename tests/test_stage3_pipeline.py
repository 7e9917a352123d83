"""The whole pipeline on a cohort of its own (`--set corpus.sources=[PATH]`): another seed, another ROI count,
other effect sizes, nothing about its size restated in the config; instruct and eval follow align, and the
ablation variants run beside the main model on the same corpus. Tiny settings and the tiny random Llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from corpus_builder.config import SourceConfig
from corpus_builder.sources import with_roi_count
from fmrilm.config import load_config
from fmrilm.pipeline import run_pipeline
from fmrilm.runner import read_record
from fmrilm_core.errors import InputError
from tests.conftest import tiny_sets

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"
N_OTHER = 16  # the TINY settings synthesise 12 ROIs; the demo config 32


@pytest.fixture(scope="module")
def other_cohort(tmp_path_factory) -> Path:
    from corpus_builder.config import SynthConfig
    from corpus_builder.synth import synthesize

    root = tmp_path_factory.mktemp("other_cohort") / "src"
    synthesize(SynthConfig(subjects=16, seed=7, length_scale=0.3, datasets=["UKB", "ABCD"], n_rois=N_OTHER,
                           effects={"sex": 2.0, "age": 0.5, "fluid_intelligence": 0.5, "diagnosis": 2.0}), root)
    return root


def test_the_roi_count_is_read_from_the_sources_unless_set(other_cohort):
    from corpus_builder.extraction import discover_all

    cfg = SourceConfig()
    records = discover_all([str(other_cohort)], cfg)
    assert cfg.atlas.n_rois is None and with_roi_count(records, cfg).atlas.n_rois == N_OTHER
    fixed = SourceConfig.model_validate({"atlas": {"n_rois": 450}})
    assert with_roi_count(records, fixed) is fixed  # a configured count is kept (and checked per scan)
    for record in records:
        record.error = "unreadable"
    with pytest.raises(InputError, match="set corpus.source.atlas.n_rois"):
        with_roi_count(records, cfg)


@pytest.fixture(scope="module")
def pipeline_on_other_cohort(tmp_path_factory, tiny_llm_dir, other_cohort):
    import ray

    work = tmp_path_factory.mktemp("other_pipeline") / "work"
    sets = tiny_sets(tiny_llm_dir) + [
        f"corpus.sources=[{other_cohort}]", "corpus.splits.fractions=[0.5,0.2,0.3]", "eval.tasks=[sex,age]",
        "ablations={no_descriptors: [tokenizer.loss.contrastive=0, align.objectives.f2t=0], "
        "full_finetuning: [align.lora.enabled=false, instruct.lora.enabled=false]}"]
    try:
        result = run_pipeline(load_config(DEMO, sets), work)
    finally:
        ray.shutdown()
    return result, work


def test_demo_config_runs_on_another_cohort_and_scores_the_model_beside_the_fc_baseline(pipeline_on_other_cohort):
    result, work = pipeline_on_other_cohort
    main = [s.name for s in result.stages if "/" not in s.name]
    assert main == ["corpus", "tokenizer", "align", "instruct", "eval"]  # the cohort has sources: no synth stage
    assert json.loads((work / "tokenizer" / "tokenizer" / "config.json").read_text())["config"]["n_rois"] == N_OTHER
    assert json.loads((work / "align" / "brain.json").read_text())["n_rois"] == N_OTHER
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"sex", "age"}
    for entry in metrics.values():
        assert "skipped" not in entry, entry
        assert {"zero_shot", "fc_baseline", "tokenizer_probe"} <= set(entry)
        metric = "auc" if entry["kind"] == "classification" else "mae"
        assert entry["zero_shot"]["n"] == entry["fc_baseline"]["n"] > 0 and metric in entry["fc_baseline"]
        assert entry["in_tuning_mix"]  # the stage-3 folder was tuned on every attribute: its zero_shot is tuned
    assert read_record(work / "eval")["input_run_id"] == read_record(work / "instruct")["run_id"]


def test_every_saved_model_has_a_model_card_a_stock_reader_parses_and_lineage(pipeline_on_other_cohort):
    from huggingface_hub import ModelCard

    _, work = pipeline_on_other_cohort
    fingerprint = json.loads((work / "instruct" / "lineage.json").read_text())["corpus"]["splits_sha256"]
    for folder, stage in ((work / "tokenizer" / "tokenizer", "tokenizer"), (work / "align", "align"),
                          (work / "instruct", "instruct")):
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == "other" and "fmri-lm" in card.data.tags, folder
        lineage = json.loads((folder / "lineage.json").read_text())
        assert lineage["stage"] == stage and lineage["corpus"]["splits_sha256"] == fingerprint
        assert fingerprint in card.text
        assert not [s for s in lineage["trained_subjects"] if s.split("-", 1)[1] in card.text]  # counts, not ids
    # the eval stage wrote its figures, with intervals and the FC baseline beside them, into the stage-3 card
    text = ModelCard.load(work / "instruct" / "README.md").text
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    auc = metrics["sex"]["zero_shot"]
    assert f"{auc['auc']:.3f} [{auc['ci']['auc'][0]:.3f}, {auc['ci']['auc'][1]:.3f}]" in text
    assert "fc_baseline" in text and str(work / "eval") in text


def test_ablation_variants_run_on_the_same_corpus_and_are_reported_beside_the_main_model(pipeline_on_other_cohort):
    result, work = pipeline_on_other_cohort
    variants = {s.name for s in result.stages if "/" in s.name}
    # full fine-tuning leaves stage 1 as it is: its tokenizer is the main one, not trained again
    assert variants == {"no_descriptors/tokenizer", "no_descriptors/align", "no_descriptors/instruct",
                        "no_descriptors/eval", "full_finetuning/align", "full_finetuning/instruct",
                        "full_finetuning/eval"}
    assert not (work / "ablations" / "full_finetuning" / "tokenizer").exists()
    no_desc = read_record(work / "ablations" / "no_descriptors" / "align")
    assert no_desc["config"]["align"]["objectives"]["f2t"] == 0
    assert no_desc["inputs"]["corpus"]["run_id"] == read_record(work / "corpus")["run_id"]
    full = read_record(work / "ablations" / "full_finetuning" / "align")
    assert full["inputs"]["tokenizer"]["run_id"] == read_record(work / "tokenizer")["run_id"]
    assert not json.loads((work / "ablations" / "full_finetuning" / "align" / "brain.json").read_text())["lora"]

    summary = json.loads((work / "ablations.json").read_text())
    assert list(summary) == ["main", "no_descriptors", "full_finetuning"]
    for entry in summary.values():
        assert set(entry["figures"]) == {"sex", "age"} and entry["metrics"] == {"sex": "auc", "age": "mae"}
        assert {"zero_shot", "fc_baseline"} <= set(entry["figures"]["sex"])
    # the baselines do not depend on the model: the same figure in every column
    assert len({entry["figures"]["sex"]["fc_baseline"] for entry in summary.values()}) == 1
    report = (work / "eval" / "report.html").read_text()
    table = re.search(r'<table id="ablations">.*?</table>', report, re.S).group(0)
    assert all(f"<th>{name}</th>" in table for name in summary)


def test_a_bad_ablation_is_refused_in_one_line_naming_it(tmp_path, tiny_llm_dir):
    from fmrilm.ablations import variant_config

    cfg = load_config(DEMO, tiny_sets(tiny_llm_dir))
    with pytest.raises(InputError, match=r"^ablations\.typo: align\.lora\.enabeld: unknown key$"):
        variant_config(cfg, "typo", ["align.lora.enabeld=false"])


def test_a_share_of_the_train_subjects_keeps_whole_subjects(stage1):
    """`align.train_subjects` (the data-size ablation): a seeded share of the subjects, every scan of each kept."""
    from corpus_builder.readers import read_manifest, split_keys
    from tests.conftest import N_ROIS, T
    from tokenizer_train.data import ScanBatches, subject_share

    corpus, _ = stage1
    keys = split_keys(corpus, "train")
    subject = read_manifest(corpus).set_index("key")["subject"]
    half = subject_share(corpus, keys, 0.5, seed=0)
    kept = {subject[k] for k in half}
    assert len(kept) == round(0.5 * len({subject[k] for k in keys})) and 0 < len(half) < len(keys)
    assert half == [k for k in keys if subject[k] in kept] == subject_share(corpus, keys, 0.5, seed=0)
    assert subject_share(corpus, keys, 0.5, seed=1) != half  # another seed, another draw
    assert len({subject[k] for k in subject_share(corpus, keys, 0.01, seed=0)}) == 1  # never empty
    assert ScanBatches(corpus, "train", 2, length=T, n_rois=N_ROIS, subjects=0.5).keys == half
