"""The README.md model card of a saved model folder (docs/design.md): a stock huggingface_hub reader parses it, it
names the corpus and warns about a synthetic one, it never prints a subject, and `add_figures` replaces the figures
section alone.

huggingface_hub's `ModelCard.load` takes a local file (a folder path would be read as a Hub repo id), so the tests
load `folder / "README.md"`, as a user of the folder would.
"""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from fmrilm_core.errors import InputError
from fmrilm_core.model_card import (
    CARD,
    FIGURES_END,
    FIGURES_START,
    NOT_EVALUATED,
    SYNTHETIC_WARNING,
    add_figures,
    write_model_card,
)

SPLITS = "ab12" * 16
SCHEME = "9f3e" * 16
NORMS = "77aa" * 16
OTHER_SPLITS = "cd34" * 16
SUBJECTS = ["UKB-1a2b3c4d5e6f", "ABCD-0f9e8d7c6b5a", "ADNI-a1b2c3d4e5f6"]
PARENT_SUBJECTS = ["UKB-feedfacecafe", "ABCD-0123456789ab"]
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

# what the integrator's export passes for each kind of folder
KIND_ARGS = {
    "tokenizer": {"library_name": "fmri-lm", "pipeline_tag": "feature-extraction", "base_model": None},
    "align": {"base_model": BASE},
    "instruct": {"base_model": "/runs/demo/llm2"},
    "fine_tune": {"base_model": "/runs/demo/llm3"},
}
PARENT_STAGE = {"tokenizer": None, "align": "tokenizer", "instruct": "align", "fine_tune": "instruct"}
FIGURE = {"task": "sex", "protocol": "zero_shot", "metric": "auc", "value": 0.91, "ci": [0.85, 0.96],
          "baseline": "fc_baseline", "baseline_value": 0.95, "baseline_ci": [0.9, 0.99], "diff": -0.04,
          "diff_ci": [-0.1, 0.02], "n": 40}


def corpus(splits: str = SPLITS, synthetic: bool = True) -> dict:
    return {"path": "/abs/corpus", "splits_sha256": splits, "pseudonym_scheme": SCHEME, "norms_sha256": NORMS,
            "scans": {"train": 36, "val": 6, "test": 18}, "datasets": {"UKB": 20, "ABCD": 20, "ADNI": 20},
            "synthetic": synthetic}


def lineage(kind: str, synthetic: bool = True) -> dict:
    parent = None
    if PARENT_STAGE[kind] is not None:
        parent = {"format": "fmrilm-lineage", "version": 1, "stage": PARENT_STAGE[kind],
                  "corpus": corpus(OTHER_SPLITS, synthetic), "trained_subjects": PARENT_SUBJECTS, "parent": None}
    return {"format": "fmrilm-lineage", "version": 1, "stage": kind, "corpus": corpus(synthetic=synthetic),
            "trained_subjects": SUBJECTS, "parent": parent}


def write(folder, kind: str, **overrides):
    args = {"kind": kind, "title": f"fMRI-LM {kind} (test)", "summary": "A model of the test cohort.",
            "lineage": lineage(kind), "config": {"steps": 400, "lr": 3e-4, "lora": {"r": 16}}, **KIND_ARGS[kind],
            **overrides}
    return write_model_card(folder, **args)


def figures_section(text: str) -> str:
    return text[text.index(FIGURES_START):text.index(FIGURES_END) + len(FIGURES_END)]


def outside_figures(text: str) -> tuple[str, str]:
    return text[:text.index(FIGURES_START)], text[text.index(FIGURES_END):]


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_stock_reader_parses_the_front_matter(tmp_path, kind):
    path = write(tmp_path, kind)
    assert path == tmp_path / CARD
    data = ModelCard.load(path).data
    if kind == "tokenizer":
        assert data.base_model is None
        assert (data.library_name, data.pipeline_tag) == ("fmri-lm", "feature-extraction")
    else:
        assert data.base_model == KIND_ARGS[kind]["base_model"]
        assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation")
    assert data.license == "other" and data.license_name == "set-by-the-lab"
    assert {"fmri", "neuroimaging", "fmri-lm", "synthetic-data"} <= set(data.tags)
    stage_tags = {"tokenizer": "stage-1-tokenizer", "align": "stage-2-align", "instruct": "stage-3-instruct",
                  "fine_tune": "fine-tuned"}
    assert stage_tags[kind] in data.tags


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_card_names_the_corpus_warns_and_prints_no_subject(tmp_path, kind):
    # a subject of the lineage (an input model's included) that slipped into the config or the title must not
    # reach the card either
    known = SUBJECTS + (PARENT_SUBJECTS if PARENT_STAGE[kind] is not None else [])
    path = write(tmp_path, kind, config={"steps": 400, "holdout": SUBJECTS[0], "note": known[-1]},
                 title=f"model of {SUBJECTS[1]}")
    text = path.read_text()
    assert SPLITS in text and SCHEME in text and NORMS in text
    assert SYNTHETIC_WARNING in text
    assert "not a diagnostic device" in text
    for subject in known:
        assert subject not in text
        assert subject.split("-")[1] not in text  # nor the bare pseudonym
    assert "Subjects trained on: 3" in text  # counted, not listed
    for split, count in {"train": 36, "val": 6, "test": 18}.items():
        assert f"| {split} | {count} |" in text
    for dataset in ("UKB", "ABCD", "ADNI"):
        assert f"| {dataset} | 20 |" in text
    if PARENT_STAGE[kind] is not None:  # one line for the input model, with its own corpus fingerprint
        lines = [line for line in text.splitlines() if line.startswith(f"- {PARENT_STAGE[kind]}: corpus")]
        assert len(lines) == 1 and OTHER_SPLITS in lines[0]
    assert "```yaml\nsteps: 400\n" in text
    assert NOT_EVALUATED in figures_section(text)


def test_real_cohort_has_no_synthetic_tag_or_warning(tmp_path):
    path = write(tmp_path, "align", lineage=lineage("align", synthetic=False))
    assert "synthetic-data" not in ModelCard.load(path).data.tags
    assert SYNTHETIC_WARNING not in path.read_text()


def test_synthetic_input_model_makes_the_card_synthetic(tmp_path):
    own = lineage("instruct", synthetic=False)
    own["parent"]["corpus"]["synthetic"] = True
    path = write(tmp_path, "instruct", lineage=own)
    assert "synthetic-data" in ModelCard.load(path).data.tags
    assert SYNTHETIC_WARNING in path.read_text()


def test_card_without_lineage_or_with_missing_keys(tmp_path):
    path = write(tmp_path / "none", "align", lineage=None)
    assert ModelCard.load(path).data.library_name == "transformers"
    assert "No lineage recorded" in path.read_text()
    path = write(tmp_path / "sparse", "align", lineage={"stage": "align", "corpus": {"splits_sha256": SPLITS}})
    text = path.read_text()
    assert SPLITS in text and "not recorded" in text
    assert ModelCard.load(path).data.tags[:3] == ["fmri", "neuroimaging", "fmri-lm"]


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_add_figures_replaces_only_the_figures_section(tmp_path, kind):
    path = write(tmp_path, kind)
    before = path.read_text()
    add_figures(tmp_path, [FIGURE], "eval /runs/demo/eval (zero_shot)")
    once = path.read_text()
    assert outside_figures(once) == outside_figures(before)
    row = "| sex | zero_shot | auc | 0.910 [0.850, 0.960] | fc_baseline | 0.950 [0.900, 0.990] | " \
          "-0.040 [-0.100, 0.020] | 40 |"
    assert row in figures_section(once)
    assert "eval /runs/demo/eval (zero_shot)" in once and NOT_EVALUATED not in once

    regression = {"task": "age", "protocol": "k_shot_2", "metric": "mae", "value": 6.2, "ci": [5.1, 7.4], "n": 40}
    add_figures(tmp_path, [regression], "eval /runs/demo/eval2 (k_shot_2)")
    twice = path.read_text()
    assert twice.count(FIGURES_START) == 1 and twice.count(FIGURES_END) == 1 and twice.count("## Figures") == 1
    assert outside_figures(twice) == outside_figures(before)
    assert "| age | k_shot_2 | mae | 6.200 [5.100, 7.400] | — | — | — | 40 |" in twice
    assert "fc_baseline" not in figures_section(twice)  # the first table is gone, not appended to
    assert ModelCard.load(path).data.pipeline_tag == KIND_ARGS[kind].get("pipeline_tag", "text-generation")
    assert [p.name for p in tmp_path.iterdir()] == [CARD]  # no temporary file left behind


def test_figures_given_at_write_time_and_rows_without_a_value(tmp_path):
    path = write(tmp_path, "instruct", figures=[FIGURE])
    assert "| sex | zero_shot | auc | 0.910 [0.850, 0.960]" in path.read_text()
    with pytest.raises(ValueError, match="figure row 0: missing value"):
        add_figures(tmp_path, [{"task": "sex", "protocol": "zero_shot", "metric": "auc"}], "eval")
    assert "| sex | zero_shot | auc | 0.910" in path.read_text()  # a bad row leaves the card as it was


def test_add_figures_to_a_card_without_the_section_appends_it(tmp_path):
    # e.g. the README.md peft writes beside an adapter
    original = "---\nlibrary_name: peft\n---\n\n# Model\n\nSome text.\n"
    (tmp_path / CARD).write_text(original)
    add_figures(tmp_path, [FIGURE], "eval")
    text = (tmp_path / CARD).read_text()
    assert text.startswith(original.rstrip("\n")) and text.count(FIGURES_START) == 1
    add_figures(tmp_path, [FIGURE], "eval")
    assert (tmp_path / CARD).read_text() == text


def test_add_figures_without_a_card_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no model card"):
        add_figures(tmp_path, [FIGURE], "eval")


def test_load_instructions_follow_the_folder(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    text = write(tmp_path / "lora", "instruct").read_text()
    assert "AutoPeftModelForCausalLM.from_pretrained(folder)" in text
    assert "AutoModelForCausalLM.from_pretrained(folder)" not in text.replace("AutoPeftModelForCausalLM", "")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    text = write(tmp_path / "full", "align").read_text()
    assert "AutoModelForCausalLM.from_pretrained(folder)" in text and "AutoPeft" not in text
    text = write(tmp_path / "tok", "tokenizer").read_text()
    assert "BrainTokenizer.from_pretrained(folder)" in text and "AutoModel" not in text


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind 'stage9'"):
        write_model_card(tmp_path, kind="stage9", title="t", summary="s", lineage=None, config={})
