"""Data lineage (docs/design.md): the corpus fingerprint, the record every saved model keeps, and the checks that keep a
test subject any stage trained on out of a figure."""

from __future__ import annotations

import json

import pytest

from corpus_builder.lineage import corpus_fingerprint, split_subjects, stage_lineage
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import check_corpus, read_lineage, write_lineage
from tests.conftest import tiny_cohort


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """One synthetic source built twice (split seeds 0 and 1) and another cohort with another pseudonym secret."""
    import ray

    from corpus_builder.build import build_corpus
    from fmrilm.config import load_config

    root = tmp_path_factory.mktemp("lineage")
    first = tiny_cohort(root / "a", subjects=16, fractions="[0.5,0.2,0.3]", secret="a" * 64)
    cfg = load_config(None, ["corpus.source.cleaning.length=32", "corpus.source.atlas.n_rois=12",
                             "corpus.build.shard_size=8", "corpus.build.workers=2",
                             "corpus.splits.fractions=[0.5,0.2,0.3]"])
    build_corpus([str(root / "a" / "src")], cfg.corpus, root / "reseeded", seed=1)
    ray.shutdown()
    other = tiny_cohort(root / "b", subjects=8, fractions="[0.5,0.2,0.3]", secret="b" * 64)
    return first, root / "reseeded", other


def test_fingerprint_names_the_split_assignment_scheme_and_norms_never_the_secret(cohorts):
    first, reseeded, other = cohorts
    a, b, c = corpus_fingerprint(first), corpus_fingerprint(reseeded), corpus_fingerprint(other)
    assert a["pseudonym_scheme"] == b["pseudonym_scheme"] != c["pseudonym_scheme"]  # same secret, another one
    assert a["splits_sha256"] != b["splits_sha256"]  # another split seed moves subjects between splits
    assert a["synthetic"] and sum(a["scans"].values()) == sum(a["datasets"].values())
    blob = json.dumps(a)
    assert "a" * 16 not in blob  # the secret is nowhere
    assert corpus_fingerprint(first) == a  # stable: a later stage recomputes the same record


def test_eval_refuses_a_rebuilt_corpus_and_names_the_stage_whose_subjects_it_would_test_on(cohorts):
    first, reseeded, _ = cohorts
    tokenizer = stage_lineage("tokenizer", first, None)
    aligned = stage_lineage("align", first, tokenizer)
    here = corpus_fingerprint(reseeded)
    leaked = split_subjects(reseeded, "test") & split_subjects(first, "train")
    assert leaked, "the reseeded build must move a train subject into the test split for this test"
    with pytest.raises(InputError, match="key -> split assignment") as err:
        check_corpus(aligned, here, split_subjects(reseeded, "test"))
    assert "\n" not in str(err.value)
    # even called external, a corpus of the same scheme is checked subject by subject
    with pytest.raises(InputError, match=r"training subjects of stage 2 \(alignment\)"):
        check_corpus(aligned, here, split_subjects(reseeded), external=True)
    done = check_corpus(aligned, corpus_fingerprint(first), split_subjects(first, "test"))
    assert done["external"] is False and [s["stage"] for s in done["lineage"]] == ["align", "tokenizer"]


def test_an_external_cohort_of_another_scheme_is_allowed_and_says_what_could_not_be_compared(cohorts):
    first, _, other = cohorts
    aligned = stage_lineage("align", first, stage_lineage("tokenizer", first, None))
    with pytest.raises(InputError, match="pass --external"):
        check_corpus(aligned, corpus_fingerprint(other), split_subjects(other, "test"))
    done = check_corpus(aligned, corpus_fingerprint(other), split_subjects(other), external=True)
    assert done["external"] and done["stages_not_comparable"] == ["align", "tokenizer"]
    assert done["subjects_checked"] == len(split_subjects(other))


def test_a_stage_refuses_a_corpus_whose_held_out_subjects_its_input_model_trained_on(cohorts):
    first, reseeded, _ = cohorts
    tokenizer = stage_lineage("tokenizer", first, None)
    with pytest.raises(InputError, match=r"held-out subjects were training subjects of stage 1"):
        stage_lineage("align", reseeded, tokenizer)
    few = stage_lineage("fine_tune", first, tokenizer, keys=sorted(split_subjects_keys(first))[:2])
    assert 1 <= len(few["trained_subjects"]) <= 2 and few["parent"] == tokenizer


def split_subjects_keys(corpus):
    from corpus_builder.readers import split_keys

    return split_keys(corpus, "train")


def test_lineage_round_trips_and_a_folder_without_it_is_a_one_line_error(cohorts, tmp_path):
    first, _, _ = cohorts
    record = stage_lineage("tokenizer", first, None)
    write_lineage(tmp_path, record)
    assert read_lineage(tmp_path) == record
    with pytest.raises(InputError, match="no lineage.json.*retrain it") as err:
        read_lineage(tmp_path / "elsewhere")
    assert "\n" not in str(err.value)
