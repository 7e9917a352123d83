"""The paper's sanity check on a synthetic cohort with a planted sex effect (slow: ~3 min on 2 cores)."""

import pytest

from corpus_builder.build import build_corpus
from corpus_builder.config import CorpusConfig, SplitConfig, SynthConfig
from corpus_builder.sanity import sanity_check
from corpus_builder.synth import synthesize


@pytest.mark.slow
def test_descriptor_z_values_and_caption_text_each_predict_sex(tmp_path):
    import ray

    synthesize(SynthConfig(subjects=200, datasets=["UKB", "ABCD"]), tmp_path / "source")
    cfg = CorpusConfig(splits=SplitConfig(fractions=(0.6, 0.2, 0.2)))
    try:
        build_corpus([str(tmp_path / "source")], cfg, tmp_path / "corpus")
    finally:
        ray.shutdown()
    result = sanity_check(tmp_path / "corpus", "sex", "tfidf")
    assert result["test"] >= 60
    assert result["z_accuracy"] > max(0.75, result["majority_baseline"] + 0.15)
    assert result["caption_tfidf_accuracy"] > result["majority_baseline"] + 0.1
