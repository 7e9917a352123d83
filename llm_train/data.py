"""Stage-2 batches: scans of the corpus encoded by the frozen brain tokenizer, their captions, and plain text.

Scans come through stage 1's `ScanBatches` (the corpus reader, batches that depend only on seed, step and rank, so
a resumed run repeats an uninterrupted one); the frozen tokenizer turns each batch into codes [B, W, N] and, for
the features mode, its continuous features `to_llm(z)` [B, W, N, llm_dim]. Captions become the F2T suffix
(prompt + caption + eos, loss on the caption and eos only). Text chunks for T2T are cut from one token stream of
the text corpus; every tenth document is held out for the perplexity measure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmrilm_core.errors import InputError
from llm_train.connectivity import ConnectivityTokens
from llm_train.model import IGNORE
from tokenizer_train.data import ScanBatches
from tokenizer_train.model import BrainTokenizer
from tokenizer_train.text import DEFAULT_TEXT_CORPUS, read_text_corpus


@torch.no_grad()
def encode_scans(brain_tokenizer: BrainTokenizer, x: torch.Tensor, features: bool,
                 connectivity: ConnectivityTokens | None = None) -> dict[str, torch.Tensor]:
    """X [B, T, N] -> {'codes': [B, W, N]} (+ 'features': [B, W, N, llm_dim] fp32 when asked, + 'connectivity':
    the connectivity token ids [B, P] when the model has them)."""
    out = {"codes": brain_tokenizer.encode(x).cpu()}
    if connectivity is not None:
        out["connectivity"] = connectivity.ids(x.cpu())
    if features:
        weight = brain_tokenizer.patch_embed.weight
        z = brain_tokenizer.quantizer_inputs(x.to(device=weight.device, dtype=weight.dtype))
        out["features"] = brain_tokenizer.to_llm(z).float().cpu()
    return out


class CaptionSuffix:
    """prompt + caption + eos as ids, labels (IGNORE on the prompt) and a padding mask, right-padded per batch."""

    def __init__(self, tokenizer, prompt: str, max_caption_tokens: int):
        self.tokenizer = tokenizer
        self.prompt_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
        self.max_caption_tokens = max_caption_tokens
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = []
        for caption in captions:
            ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.max_caption_tokens]
            rows.append((self.prompt_ids + ids + [self.eos], [IGNORE] * len(self.prompt_ids) + ids + [self.eos]))
        longest = max(len(ids) for ids, _ in rows)
        out = {"suffix_ids": torch.full((len(rows), longest), self.pad, dtype=torch.long),
               "suffix_labels": torch.full((len(rows), longest), IGNORE, dtype=torch.long),
               "suffix_mask": torch.zeros(len(rows), longest, dtype=torch.long)}
        for i, (ids, labels) in enumerate(rows):
            out["suffix_ids"][i, : len(ids)] = torch.tensor(ids)
            out["suffix_labels"][i, : len(ids)] = torch.tensor(labels)
            out["suffix_mask"][i, : len(ids)] = 1
        return out

    @property
    def max_length(self) -> int:
        return len(self.prompt_ids) + self.max_caption_tokens + 1


def held_out_text(path: str | Path | None) -> list[str]:
    """Every tenth document of the text corpus: never cut into T2T chunks, kept for the perplexity measure."""
    path = Path(path) if path is not None else DEFAULT_TEXT_CORPUS
    try:
        return read_text_corpus(path)[::10]
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"T2T text corpus: {err}") from None


class TextChunks:
    """The text corpus as one token stream (documents joined by eos); chunk `i` of rank `r` is deterministic."""

    def __init__(self, tokenizer, path: str | Path | None, length: int, seed: int = 0):
        path = Path(path) if path is not None else DEFAULT_TEXT_CORPUS
        try:
            docs = read_text_corpus(path)
        except (FileNotFoundError, ValueError) as err:
            raise InputError(f"T2T text corpus: {err}") from None
        train_docs = [d for i, d in enumerate(docs) if i % 10] or docs
        eos = tokenizer.eos_token_id
        stream = [t for d in train_docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
        if len(stream) < length + 1:
            raise InputError(f"{path}: {len(stream)} tokens of text, fewer than one T2T chunk ({length})")
        self.stream = torch.tensor(stream, dtype=torch.long)
        self.length, self.seed = length, seed
        self.n_chunks = len(stream) // length

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        start = (step * world_size + rank) * batch_size
        order = np.random.default_rng([self.seed, 7]).permutation(self.n_chunks)
        picks = [int(order[(start + i) % self.n_chunks]) for i in range(batch_size)]
        return torch.stack([self.stream[p * self.length: (p + 1) * self.length] for p in picks])


class AlignBatches:
    """Everything one step of stage 2 needs, from (seed, step, rank) alone."""

    def __init__(self, corpus: Path, split: str, brain_tokenizer: BrainTokenizer, suffix: CaptionSuffix,
                 text: TextChunks | None, *, batch_size: int, features: bool, seed: int, rank: int = 0,
                 world_size: int = 1, subjects: float = 1.0, connectivity: ConnectivityTokens | None = None):
        c = brain_tokenizer.config
        self.scans = ScanBatches(corpus, split, batch_size, length=c.length, n_rois=c.n_rois, seed=seed, rank=rank,
                                 world_size=world_size, subjects=subjects)
        self.brain_tokenizer, self.suffix, self.text = brain_tokenizer, suffix, text
        self.batch_size, self.features, self.rank, self.world_size = batch_size, features, rank, world_size
        self.connectivity = connectivity

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        x, captions, keys = self.scans.batch(step)
        out = encode_scans(self.brain_tokenizer, x, self.features, self.connectivity) | self.suffix(captions)
        if self.text is not None:
            out["text_ids"] = self.text.batch(step, self.batch_size, self.rank, self.world_size)
        return out

    def scans_of(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Codes (and features) of the named scans of this split, in that order."""
        x = torch.from_numpy(self.scans.corpus.batch(keys).astype(np.float32))
        return encode_scans(self.brain_tokenizer, x, self.features, self.connectivity)
