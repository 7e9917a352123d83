"""Shared fixtures: tiny configs and a tiny synthetic cohort, so the default suite stays fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from fmrilm_core.runtime import LocalRuntime

# A small but real pipeline: 6 subjects, 12 ROIs, short scans, T = 32.
TINY = ["synth.subjects=6", "synth.length_scale=0.3", "synth.datasets=[UKB,ABCD]",
        "corpus.source.cleaning.length=32", "corpus.splits.fractions=[0.5,0.5,0.0]",
        "tokenizer.model={length: 32, patch: 8, dim: 16, depth: 1, heads: 2, codebook_size: 32, code_dim: 8, "
        "llm_dim: 16, decoder_depth: 1}", "tokenizer.batch_size=2", "tokenizer.steps=2", "tokenizer.eval_every=2",
        "tokenizer.checkpoint_every=2", "tokenizer.text.text_batch=32", "tokenizer.deepspeed=null",
        "synth.n_rois=12", "align.batch_size=2", "align.steps=2", "align.eval_every=2", "align.checkpoint_every=2",
        "align.max_caption_tokens=48", "align.t2t_tokens=16",
        "align.eval={scans: 4, caption_scans: 2, max_new_tokens: 4, t2t_docs: 2}"]


def tiny_sets(llm_dir: Path) -> list[str]:
    """TINY with the tiny LLM as stage 1's text side and stage 2's base."""
    return TINY + [f"tokenizer.text.llm={llm_dir}", f"align.base={llm_dir}"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_llm_dir):
    """One real pipeline run (synth -> Ray corpus build -> DeepSpeed tokenizer, MLflow sqlite) shared by the
    tests that inspect it."""
    import ray

    from cluster.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("pipeline") / "work"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml",
                      tiny_sets(tiny_llm_dir) + ["synth.seed=11"])
    result = run_pipeline(cfg, work)
    ray.shutdown()
    return cfg, result, work


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """Tests choose their own store; a developer's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FMRILM_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("FMRILM_PSEUDONYM_KEY_FILE", raising=False)


TINY_WORDS = ["the", "brain", "default", "network", "is", "strongly", "coupled", "weak", "visual", "salience"]


def tiny_tokenizer():
    """A word-level tokenizer built offline (tests never download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(TINY_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 16, context 512) with that tokenizer, saved as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llm")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(TINY_WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class StopAfter(LocalRuntime):
    """A runtime that stops the run right after committing the checkpoint of `step` (a killed job)."""

    def __init__(self, root, step):
        super().__init__(root)
        self.stop = step

    def commit_checkpoint(self, directory, step, metrics):
        super().commit_checkpoint(directory, step, metrics)
        if step == self.stop:
            raise KeyboardInterrupt
