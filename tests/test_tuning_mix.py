"""The stage-3 tuning mix leaves excluded attributes out of every item, and records what it did teach.

A task is "zero-shot" only if no trained text names its attribute: not a QA item, not a turn of a multi-turn or
multi-target item, not the phenotype sentence at the end of a description, not the stage-2 captions.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pandas as pd
import pytest

from corpus_builder.captions import caption_for
from corpus_builder.config import CaptionConfig, InstructionConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES
from corpus_builder.instructions import (
    DIAGNOSES,
    QUESTIONS,
    canonical_answers,
    instruction_items,
    item_attributes,
    without_attributes,
)
from fmrilm_core.errors import InputError
from llm_train.instruct import select_items, trained_attributes

TYPES = ("qa", "multi_turn", "multi_target", "description")
CODES = ("AD", "ADHD", "ASD", "CN", "MCI", "TD", "Control", "healthy control", "HC")
SEX = re.compile(r"\b(males?|females?|men|women|man|woman)\b", re.IGNORECASE)
# every diagnosis as a code or a full name, as a word; "control" also names the frontoparietal control network in
# every caption, so that phrase is taken out before looking
DIAGNOSIS = re.compile(r"\b(" + "|".join(sorted({re.escape(w) for w in (*DIAGNOSES, *DIAGNOSES.values())},
                                                key=len, reverse=True)) + r"|diagnos\w*)\b", re.IGNORECASE)
AGE = re.compile(r"\b\d+ years \(|\b\d+-year-old\b")


def sex_or_diagnosis(text: str) -> list[str]:
    text = re.sub(r"frontoparietal control", "", text, flags=re.IGNORECASE)
    return SEX.findall(text) + [m.group(0) for m in DIAGNOSIS.finditer(text)]


def texts(selected: list[tuple[str, dict]]) -> list[str]:
    return [turn["content"] for _, item in selected for turn in item["turns"]]


def real_caption(seed: int) -> str:
    rng = random.Random(seed)
    z = {n: rng.uniform(-3, 3) for n in DESCRIPTOR_NAMES}
    pair_z = {p: rng.uniform(-2, 2) for p in PAIR_NAMES}
    return caption_for(z, pair_z, {}, CaptionConfig(), seed=seed)


def full_scans(n: int) -> dict[str, list[dict]]:
    """{key: the real builder's items} of n scans that have every phenotype (all diagnoses, both sexes)."""
    out = {}
    for s in range(n):
        pheno = {"sex": "MF"[s % 2], "age": 8.6 + 7.3 * s, "fluid_intelligence": 4 + s % 7,
                 "diagnosis": CODES[s % len(CODES)], "site": "Leeds"}
        out[f"UKB-s{s:03d}-1-1"] = instruction_items(pheno, real_caption(s), seed=s, cfg=InstructionConfig())
    return out


# ---------------------------------------------------------------------------------------------- the selection

def test_excluded_attributes_leave_every_item_and_the_rest_stays():
    items = full_scans(36)
    everything = select_items(items, TYPES, set())
    assert any(sex_or_diagnosis(t) for t in texts(everything))  # the check below can fail: the full mix names both
    assert trained_attributes(everything) == ["age", "diagnosis", "fluid_intelligence", "sex"]

    selected = select_items(items, TYPES, {"sex", "diagnosis"})
    leaks = [(t, sex_or_diagnosis(t)) for t in texts(selected) if sex_or_diagnosis(t)]
    assert not leaks, leaks[:3]
    assert trained_attributes(selected) == ["age", "fluid_intelligence"]
    assert {item["type"] for _, item in selected} == set(TYPES)  # every kind of item is still trained on
    said = texts(selected)
    assert any(AGE.search(t) for t in said) and any("fluid intelligence" in t for t in said)
    for _, item in selected:
        assert item_attributes(item) <= {"age", "fluid_intelligence"}
        if item["type"] == "description":  # the caption is kept whole; only the sentence after it changed
            assert item["turns"][1]["content"].startswith(item["caption"].strip())
            assert "-year-old participant with a fluid intelligence score of " in item["turns"][1]["content"]
    # every description stays, and every multi-turn / multi-target item keeps what it still has
    n_desc = sum(i["type"] == "description" for v in items.values() for i in v)
    assert sum(i["type"] == "description" for _, i in selected) == n_desc
    n_multi = sum(i["type"] in ("multi_turn", "multi_target") and bool(set(i["attribute"]) - {"sex", "diagnosis"})
                  for v in items.values() for i in v)
    assert sum(i["type"] in ("multi_turn", "multi_target") for _, i in selected) == n_multi


def test_each_item_type_under_exclusion():
    answers = canonical_answers({"sex": "M", "age": 63.4, "fluid_intelligence": 7, "diagnosis": "ADHD"})
    qa = {"type": "qa", "attribute": "sex", "turns": [{"role": "user", "content": "Sex?"},
                                                      {"role": "assistant", "content": "Male"}], "answer": "Male"}
    assert without_attributes(qa, {"sex"}) is None and without_attributes(qa, {"age"}) == qa

    turn = {"type": "multi_turn", "attribute": ["sex", "age", "diagnosis"],
            "turns": [{"role": "user", "content": "Sex?"}, {"role": "assistant", "content": "Male"},
                      {"role": "user", "content": "What about the age?"},
                      {"role": "assistant", "content": "63 years (60s)"},
                      {"role": "user", "content": "And the diagnosis?"}, {"role": "assistant", "content": "ADHD"}],
            "answer": {a: answers[a] for a in ("sex", "age", "diagnosis")}}
    one = without_attributes(turn, {"sex", "diagnosis"})
    # age's follow-up now opens the conversation, so it becomes an opening question (the phrasing at its index)
    assert one == {"type": "multi_turn", "attribute": ["age"],
                   "turns": [{"role": "user", "content": QUESTIONS["age"][1]},
                             {"role": "assistant", "content": "63 years (60s)"}],
                   "answer": {"age": "63 years (60s)"}}
    assert without_attributes(turn, {"sex", "age", "diagnosis"}) is None
    assert turn["attribute"] == ["sex", "age", "diagnosis"]  # the input item is left as it was

    target = {"type": "multi_target", "attribute": ["sex", "age", "diagnosis"],
              "turns": [{"role": "user", "content": "What are the sex, age and diagnosis of this participant?"},
                        {"role": "assistant", "content": "Sex: Male. Age: 63 years (60s). Diagnosis: ADHD."}],
              "answer": {a: answers[a] for a in ("sex", "age", "diagnosis")}}
    assert without_attributes(target, {"diagnosis"})["turns"] == [
        {"role": "user", "content": "What are the sex and age of this participant?"},
        {"role": "assistant", "content": "Sex: Male. Age: 63 years (60s)."}]
    assert without_attributes(target, {"sex", "diagnosis"})["turns"] == [
        {"role": "user", "content": "What is the age of this participant?"},
        {"role": "assistant", "content": "Age: 63 years (60s)."}]

    (description,) = [i for i in instruction_items({"sex": "M", "age": 63.4, "fluid_intelligence": 7,
                                                    "diagnosis": "ADHD"}, "Modularity was typical.", 0,
                                                   InstructionConfig()) if i["type"] == "description"]
    assert description["answer"] == ("Modularity was typical. The scan comes from a 63-year-old male participant "
                                     "diagnosed with ADHD, with a fluid intelligence score of 7.")
    after = without_attributes(description, {"sex", "diagnosis"})
    assert after["answer"] == after["turns"][1]["content"] == (
        "Modularity was typical. The scan comes from a 63-year-old participant with a fluid intelligence score of 7.")
    assert item_attributes(after) == {"age", "fluid_intelligence"}
    bare = without_attributes(description, {"sex", "age", "fluid_intelligence", "diagnosis"})
    assert bare["answer"] == "Modularity was typical." and item_attributes(bare) == set()


def test_a_corpus_built_before_the_stored_context_is_rebuilt_from_its_phenotypes_and_captions():
    items = full_scans(12)
    pheno = {}
    caps = {}
    old = {}
    for s, (key, scan) in enumerate(items.items()):
        pheno[key] = {"sex": "MF"[s % 2], "age": 8.6 + 7.3 * s, "fluid_intelligence": 4 + s % 7,
                      "diagnosis": CODES[s % len(CODES)], "dataset": "UKB", "site": None}
        caps[key] = real_caption(s)
        old[key] = [{k: v for k, v in i.items() if k not in ("caption", "context")} for i in scan]
    calls = []

    def context():
        calls.append(1)
        return pheno, caps

    for exclude in (set(), {"sex", "diagnosis"}):
        assert select_items(old, TYPES, exclude, context) == select_items(items, TYPES, exclude)
    assert len(calls) == 2  # once per selection, not once per item
    select_items(items, TYPES, {"sex"}, context)
    assert len(calls) == 2  # a current corpus needs no second read
    with pytest.raises(InputError, match="a description item without its caption and context"):
        select_items(old, TYPES, {"sex"})
    with pytest.raises(ValueError, match="rewrite it with without_attributes first"):
        item_attributes(old[next(iter(old))][-1])


# ---------------------------------------------------------------------------------------------- a built corpus

@pytest.fixture(scope="module")
def full_corpus(tmp_path_factory) -> Path:
    """A real build of 8 synthetic subjects that each have sex, age, fluid intelligence and a diagnosis."""
    import ray

    from corpus_builder.build import build_corpus
    from corpus_builder.config import SynthConfig
    from corpus_builder.synth import synthesize
    from fmrilm.config import load_config

    root = tmp_path_factory.mktemp("full_pheno")
    (root / "src").mkdir()
    (root / "src" / ".pseudonym_key").write_text("e" * 64)
    synthesize(SynthConfig(subjects=8, length_scale=0.3, datasets=["UKB"], n_rois=12), root / "src")
    table = pd.read_csv(root / "src" / "participants.tsv", sep="\t", dtype=str)
    table["diagnosis"] = [("ADHD", "CN", "AD", "ASD")[i % 4] for i in range(len(table))]
    table.to_csv(root / "src" / "participants.tsv", sep="\t", index=False)
    cfg = load_config(None, ["corpus.source.cleaning.length=32", "corpus.source.atlas.n_rois=12",
                             "corpus.build.shard_size=8", "corpus.build.workers=2",
                             "corpus.splits.fractions=[0.5,0.5,0.0]"])
    build_corpus([str(root / "src")], cfg.corpus, root / "corpus")
    ray.shutdown()
    return root / "corpus"


def test_stage2_captions_name_no_phenotype(full_corpus):
    from corpus_builder.readers import read_captions, read_phenotypes

    for split in ("train", "val"):
        pheno = read_phenotypes(full_corpus, split)
        captions = read_captions(full_corpus, split)
        assert len(captions) and set(captions) == set(pheno.index)
        for key, caption in captions.items():
            row = pheno.loc[key]
            assert set(canonical_answers(row.to_dict())) == {
                "sex", "age", "fluid_intelligence", "diagnosis"}  # this scan has every phenotype
            assert not sex_or_diagnosis(caption), (key, caption)
            assert not re.search(r"\b(age|aged|years?|old|fluid|intelligence|score)\b", caption, re.IGNORECASE)
            numbers = set(re.findall(r"\d+(?:\.\d+)?", caption))
            values = {f"{row['age']:g}", str(round(row["age"])), f"{row['fluid_intelligence']:g}"}
            assert not numbers & values, (key, numbers & values)


def test_instruct_batches_train_on_the_leak_free_mix(full_corpus):
    from llm_train.config import InstructConfig
    from llm_train.instruct import ChatFormat, InstructBatches, tuning_mix
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chat = ChatFormat(tok)
    full = InstructBatches(full_corpus, "train", None, chat, InstructConfig(), False)
    assert trained_attributes(full.items) == ["age", "diagnosis", "fluid_intelligence", "sex"]
    cfg = InstructConfig(exclude_attributes=["sex", "diagnosis"])
    data = InstructBatches(full_corpus, "train", None, chat, cfg, False)
    said = [t["content"] for _, turns in data.examples for t in turns]
    assert said and not [t for t in said if sex_or_diagnosis(t)]
    assert any(AGE.search(t) for t in said) and any("fluid intelligence" in t for t in said)
    assert trained_attributes(data.items) == ["age", "fluid_intelligence"]
    assert [turns for _, turns in data.examples] == [item["turns"] for _, item in data.items]
    assert {item["type"] for _, item in data.items} == set(TYPES)
    # the same corpus as if built before description items kept their caption and context
    import llm_train.instruct as instruct
    from corpus_builder.readers import read_instructions

    def old_format(corpus, split):
        return {k: [{f: v for f, v in i.items() if f not in ("caption", "context")} for i in items]
                for k, items in read_instructions(corpus, split).items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(instruct, "read_instructions", old_format)
        assert tuning_mix(full_corpus, "train", cfg.types, cfg.exclude_attributes) == data.items


def test_brain_json_records_what_the_lineage_was_tuned_on():
    from llm_train.instruct import lineage_attributes

    selected = select_items(full_scans(6), TYPES, {"sex", "diagnosis"})
    assert lineage_attributes(selected, {"stage": "align"}) == ["age", "fluid_intelligence"]
    # tuned from a stage-3 folder: its weights also saw what that folder was tuned on
    tuned = {"stage": "instruct", "instruct": {"trained_attributes": ["sex"]}}
    assert lineage_attributes(selected, tuned) == ["age", "fluid_intelligence", "sex"]
    # unknown stays unknown: given (key, turns) pairs carry no attribute; a stage-3 folder saved without the record
    assert lineage_attributes(None, {"stage": "align"}) is None
    assert lineage_attributes(selected, {"stage": "instruct", "instruct": {"exclude_attributes": ["sex"]}}) is None
