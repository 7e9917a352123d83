"""Deterministic batches for stage 1, read through the corpus readers (split keys, zarr by key, captions).

Batch `step` on rank `r` takes positions `step * B * world + r * B + i` of an endless sequence of seeded
per-epoch permutations of the split. It depends only on (seed, step, rank, world), so a run resumed at step
k sees exactly the batches an uninterrupted run sees, and ranks never share a scan within a step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from corpus_builder.readers import ZarrCorpus, read_captions, read_manifest, split_keys
from fmrilm_core.errors import InputError


def subject_share(corpus: str | Path, keys: list[str], share: float, seed: int) -> list[str]:
    """The scans among `keys` of a seeded `share` of their subjects (at least one subject), in key order."""
    subject = read_manifest(corpus).set_index("key")["subject"]
    subjects = sorted({subject[k] for k in keys})
    n = max(1, round(share * len(subjects)))
    kept = set(np.random.default_rng([seed, 11]).permutation(subjects)[:n])
    return [k for k in keys if subject[k] in kept]


class ScanBatches:
    def __init__(self, corpus: str | Path, split: str, batch_size: int, *, length: int, n_rois: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, subjects: float = 1.0):
        """`subjects`: the share of the split's subjects whose scans are used (a seeded draw, at least one
        subject; 1.0 = all), for ablations on the amount of data."""
        self.corpus = ZarrCorpus(corpus)
        self.keys = split_keys(corpus, split)
        if not self.keys:
            raise InputError(f"{corpus}: the {split} split has no usable scan")
        if subjects < 1.0:
            self.keys = subject_share(corpus, self.keys, subjects, seed)
        t, n = self.corpus.shape[1:]
        if (t, n) != (length, n_rois):
            raise InputError(f"{corpus}: scans are T={t} x N={n}, the tokenizer config expects T={length} x N={n_rois}")
        captions = read_captions(corpus, split)
        self.caption_of = {k: captions[k] for k in self.keys}
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = (step * self.world_size + self.rank) * self.batch_size
        out = []
        for p in range(start, start + self.batch_size):
            out.append(int(self._perm(p // len(self.keys))[p % len(self.keys)]))
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], list[str]]:
        idx = self.indices(step)
        keys = [self.keys[i] for i in idx]
        x = torch.from_numpy(np.stack([self.corpus[k] for k in keys]).astype(np.float32))
        return x, [self.caption_of[k] for k in keys], keys

    def all(self, max_scans: int | None = None):
        """Every scan of the split once, in key order, in batches (for validation)."""
        keys = self.keys[:max_scans] if max_scans else self.keys
        for i in range(0, len(keys), self.batch_size):
            chunk = keys[i:i + self.batch_size]
            x = torch.from_numpy(np.stack([self.corpus[k] for k in chunk]).astype(np.float32))
            yield x, [self.caption_of[k] for k in chunk], chunk
