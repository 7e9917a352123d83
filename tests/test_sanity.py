"""The paper's sanity check on a synthetic cohort with a planted sex effect (slow: ~3 min on 2 cores)."""

import pytest

from cluster.config import load_config
from cluster.pipeline import run_pipeline
from corpus_builder.sanity import sanity_check


@pytest.mark.slow
def test_descriptor_z_values_and_caption_text_each_predict_sex(tmp_path):
    import ray

    cfg = load_config(None, ["synth.subjects=200", "synth.datasets=[UKB,ABCD]",
                             "corpus.splits.fractions=[0.6,0.2,0.2]"])
    run_pipeline(cfg, tmp_path / "work")
    ray.shutdown()
    result = sanity_check(tmp_path / "work" / "corpus", "sex", "tfidf")
    assert result["test"] >= 60
    assert result["z_accuracy"] > max(0.75, result["majority_baseline"] + 0.15)
    assert result["caption_tfidf_accuracy"] > result["majority_baseline"] + 0.1
