"""Evaluation (`fmrilm eval`, issue 18): corpus readers of instruction items and phenotypes, the tasks, option
scoring, calibration, baselines, k-shot prompts, the report. A 12-ROI synthetic corpus with a test split, a tiny
stage-1 tokenizer and a tiny random Llama aligned for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from corpus_builder.build import build_corpus
from corpus_builder.config import SynthConfig
from corpus_builder.readers import read_instructions, read_manifest, read_phenotypes, split_keys
from corpus_builder.synth import synthesize
from fmrilm_core.errors import InputError
from fmrilm_core.runtime import LocalRuntime
from tests.conftest import TINY_WORDS, tiny_tokenizer

N_ROIS, T, PATCH = 12, 32, 8  # W = 4 steps of 12 ROI tokens


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llm_eval")
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(TINY_WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """UKB (sex, age, fluid intelligence) and ABCD (sex, age, ADHD) with train, val and test splits."""
    import ray

    root = tmp_path_factory.mktemp("eval")
    synthesize(SynthConfig(subjects=32, length_scale=0.3, datasets=["UKB", "ABCD"], n_rois=N_ROIS), root / "src")
    cfg = load_config(None, [f"corpus.source.cleaning.length={T}", f"corpus.source.atlas.n_rois={N_ROIS}",
                             "corpus.build.shard_size=8", "corpus.build.workers=2",
                             "corpus.splits.fractions=[0.5,0.1,0.4]"])
    build_corpus([str(root / "src")], cfg.corpus, root / "corpus")
    ray.shutdown()
    return root / "corpus"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus, llm_dir) -> Path:
    """A stage-1 tokenizer trained on the corpus and a tiny Llama aligned to it for a few steps."""
    from llm_train.config import LLMAlignConfig
    from llm_train.train import AlignInputs
    from llm_train.train import train as train_align
    from tokenizer_train.config import TokenizerTrainConfig
    from tokenizer_train.train import TokenizerInputs
    from tokenizer_train.train import train as train_tokenizer

    root = tmp_path_factory.mktemp("eval_models")
    tok_cfg = TokenizerTrainConfig.model_validate({
        "model": {"n_rois": N_ROIS, "length": T, "patch": PATCH, "dim": 16, "depth": 1, "heads": 2,
                  "codebook_size": 16, "code_dim": 8, "llm_dim": 16, "decoder_depth": 1},
        "text": {"llm": str(llm_dir), "text_batch": 64}, "optim": {"warmup_steps": 1},
        "batch_size": 4, "steps": 2, "checkpoint_every": 2, "eval_every": 2})
    train_tokenizer(tok_cfg, TokenizerInputs(corpus, root / "tok"), LocalRuntime(root / "tok" / "checkpoints"))
    cfg = LLMAlignConfig.model_validate({
        "base": str(llm_dir), "batch_size": 2, "steps": 2, "checkpoint_every": 2, "eval_every": 2,
        "max_caption_tokens": 16, "t2t_tokens": 16, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "eval": {"scans": 2, "caption_scans": 2, "max_new_tokens": 2, "t2t_docs": 2}})
    out = root / "llm"
    train_align(cfg, AlignInputs(corpus, root / "tok" / "tokenizer", out), LocalRuntime(out / "checkpoints"))
    return out


# ---- readers ----------------------------------------------------------------------------------------------


def test_read_instructions_and_phenotypes_per_split(corpus):
    manifest = read_manifest(corpus)
    for split in ("train", "test"):
        keys = split_keys(corpus, split)
        items = read_instructions(corpus, split)
        assert sorted(items) == keys
        assert all(isinstance(v, list) and all("turns" in i for i in v) for v in items.values())
        pheno = read_phenotypes(corpus, split)
        assert list(pheno.index) == keys and (pheno["split"] == split).all()
        m = manifest.set_index("key").loc[keys]
        assert (pheno["subject"] == m["subject"]).all()
        assert set(pheno["sex"].dropna()) <= {"M", "F"}
        sexes = {k: next(i["answer"] for i in v if i["attribute"] == "sex") for k, v in items.items()}
        assert all((sexes[k] == "Male") == (pheno.at[k, "sex"] == "M") for k in keys)
    assert set(read_phenotypes(corpus, "train")["subject"]).isdisjoint(read_phenotypes(corpus, "test")["subject"])
