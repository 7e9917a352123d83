"""Connectivity tokens: a scan's network-level functional connectivity as P words beside its brain codes.

Why: a stage-1 code is a patch of one ROI's series, so the codes keep little of how ROIs move together, and that
is where sex and diagnosis live (the synthetic cohort plants them in network blocks of the FC matrix, as the
literature finds them). Measured with `bench/stage3_ceiling.py` on the 400-subject bench cohort (32 ROIs, 8
networks), test AUC of the same linear model on each reading of a scan: sex from the codes' histogram 0.30, from
the codes' "FC" 0.91, from these tokens (4 levels) 0.97, from FC 1.00. So stage 2 and 3 read both.

    X [T, N] --Pearson r between ROIs, Fisher z--> mean z over the ROI pairs of each network pair (a, b), a <= b
      --level: which of `bins` quantile bins of the train split's scans the mean falls in--> <|fc_{pair}_{level}|>

Networks are the corpus's (`rois.tsv`); a pair without any ROI pair (a one-ROI network with itself) is left out.
The bins are fitted on the train split's scans (no labels) when stage 2 starts and saved in the model folder's
`brain.json`, so stage 3, `fmrilm eval` and `fmrilm ask` level every scan the same way.

A scan whose FC is NaN for some network pair (every ROI pair of the block touches a constant ROI: a network with
fewer than two usable ROIs, or none on one side) is an InputError naming the scan and the pair, when the bins are
fitted and when a scan is levelled; it never becomes a level. Why not an "unknown" level: NaN compared with the
edges read as level 0 ("very low"), a confident claim about a network the scan does not measure; a separate
token would change every model folder's vocabulary layout (P x bins rows, which scoring and saved folders rely on)
for what the corpus build should rule out (it fails scans with too many constant ROIs, but counts them per scan,
not per network). No warnings arise here (the descriptors' FC and block means avoid empty slices), so nothing is
muted.

Layout: after the codes, before `<|scan_end|>`: `<|scan_start|> codes (W x N) fc (P) <|scan_end|> text`. F2F never
sees them (its block is the codes alone). Each token's embedding starts as the LLM's mean embedding of a phrase
("Default-Vis connectivity: very low"), so the LLM reads it as words before any step; stage 2 and 3 train the rows
as they train the brain rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from corpus_builder.descriptors.fc import block_mean, fisher_z_fc
from fmrilm_core.errors import InputError

LEVEL_WORDS = {2: ["low", "high"], 3: ["low", "typical", "high"], 4: ["very low", "low", "high", "very high"],
               5: ["very low", "low", "typical", "high", "very high"]}


def connectivity_token(pair: int, level: int) -> str:
    return f"<|fc_{pair}_{level}|>"


def network_pairs(membership: np.ndarray, n_networks: int) -> list[tuple[int, int]]:
    """(a, b), a <= b, of the networks that have at least one pair of distinct ROIs between them."""
    counts = np.bincount(membership, minlength=n_networks)
    return [(a, b) for a in range(n_networks) for b in range(a, n_networks)
            if (counts[a] > 1 if a == b else counts[a] and counts[b])]


def network_fc(x, membership: np.ndarray, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """X [B, T, N] -> [B, P]: per network pair, the mean Fisher z of the correlations between its distinct ROIs
    (the descriptors' FC and block means, `corpus_builder.descriptors.fc`; NaN where a block has no usable ROI)."""
    masks = [membership == g for g in range(int(membership.max()) + 1)]
    x = np.asarray(x, np.float64)
    out = np.empty((len(x), len(pairs)))
    for s, scan in enumerate(x):
        z = fisher_z_fc(scan)
        out[s] = [block_mean(z, masks[a], masks[b], a == b) for a, b in pairs]
    return torch.from_numpy(out).float()


def check_finite(values: np.ndarray, pairs: list[tuple[int, int]], networks: list[str],
                 keys: Sequence[str] | None = None, source: str = "connectivity tokens") -> None:
    """InputError naming the first scan (its key, else its position) and network pair whose FC `values` [S, P] is
    NaN: no level can say something true about it."""
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        s, p = (int(v) for v in bad[0])
        a, b = pairs[p]
        scan = f"scan {keys[s]}" if keys is not None else f"the scan at position {s}"
        raise InputError(f"{source}: {scan} has no FC for network pair {networks[a]}-{networks[b]} (no usable ROI "
                         f"pair: constant series); drop the scan or set align.connectivity_bins=0"
                         + (f" ({len({int(v) for v in bad[:, 0]})} scans like it here)" if len(bad) > 1 else ""))


@dataclass(frozen=True)
class ConnectivityTokens:
    """How a scan becomes P connectivity tokens, and where they sit in the vocabulary (first_id, set when added)."""

    networks: list[str]                # network names, index = network id
    membership: list[int]              # [N]: network id of each ROI (atlas order)
    pairs: list[tuple[int, int]]       # [P]
    edges: list[list[float]]           # [P][bins - 1]: upper edges of the levels, from the train split
    first_id: int = -1

    @property
    def bins(self) -> int:
        return len(self.edges[0]) + 1

    @property
    def n_tokens(self) -> int:
        """P: connectivity tokens per scan."""
        return len(self.pairs)

    @property
    def size(self) -> int:
        """Vocabulary rows: P x bins."""
        return len(self.pairs) * self.bins

    @classmethod
    def fit(cls, series, labels: list[str], bins: int, source: str = "corpus",
            keys: Sequence[str] | None = None) -> ConnectivityTokens:
        """Bins from the scans of `series` (an iterable of X [B, T, N] batches); `labels`: each ROI's network;
        `keys`: the scans' keys in the order of `series`, to name a scan with a NaN pair (else its position)."""
        if not 2 <= bins <= 16:
            raise InputError(f"connectivity bins {bins}: use 0 (off) or 2..16")
        if any(not isinstance(v, str) or not v for v in labels):
            raise InputError(f"{source}: rois.tsv names no network for some ROI; connectivity tokens need the "
                             "network of every ROI (set align.connectivity_bins=0 to go without)")
        networks = sorted(set(labels))
        membership = np.array([networks.index(v) for v in labels])
        pairs = network_pairs(membership, len(networks))
        if not pairs:
            raise InputError(f"{source}: no network has two ROIs, so there is no connectivity to tokenize")
        values = torch.cat([network_fc(x, membership, pairs) for x in series]).numpy()
        check_finite(values, pairs, networks, keys, source)  # a NaN scan would silently drop out of the quantiles
        if len(values) < bins:
            raise InputError(f"{source}: {len(values)} train scans cannot fit {bins} connectivity levels")
        edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1], axis=0).T  # [P, bins - 1]
        return cls(networks=networks, membership=membership.tolist(), pairs=[tuple(p) for p in pairs],
                   edges=edges.tolist())

    def values(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """X [B, T, N] -> network-pair mean Fisher z [B, P]; InputError for a scan with a NaN pair (`keys`, when
        given, name the scans in the message, else their position in the batch)."""
        if x.shape[-1] != len(self.membership):
            raise InputError(f"connectivity tokens: a scan has {x.shape[-1]} ROIs, the model's atlas "
                             f"{len(self.membership)}")
        values = network_fc(x, np.asarray(self.membership), self.pairs)
        check_finite(values.numpy(), self.pairs, self.networks, keys)
        return values

    def levels(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """X [B, T, N] -> level of every pair [B, P] (0 .. bins - 1)."""
        values = self.values(x, keys)
        return (values[:, :, None] > torch.tensor(self.edges, dtype=values.dtype)[None]).sum(-1)

    def ids(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """X [B, T, N] -> vocabulary ids [B, P]."""
        if self.first_id < 0:
            raise ValueError("connectivity tokens are not in a vocabulary yet (add_to)")
        return self.first_id + torch.arange(self.n_tokens) * self.bins + self.levels(x, keys)

    def names(self) -> list[str]:
        return [connectivity_token(p, level) for p in range(self.n_tokens) for level in range(self.bins)]

    def phrases(self) -> list[str]:
        """What each token means, in the order of `names` (the text its embedding row starts from)."""
        words = LEVEL_WORDS.get(self.bins) or [f"level {k + 1} of {self.bins}" for k in range(self.bins)]
        return [f"{self.networks[a]}-{self.networks[b]} connectivity: {word}"
                for a, b in self.pairs for word in words]

    def add_to(self, tokenizer) -> ConnectivityTokens:
        """Add the P x bins tokens to `tokenizer` (special: never split, dropped by decode); the spec with first_id."""
        names = self.names()
        tokenizer.add_tokens(names, special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(names))):
            raise ValueError("the tokenizer already holds some <|fc_p_l|> tokens out of order; start from a base "
                             "model")
        return replace(self, first_id=ids[0])

    @torch.no_grad()
    def init_rows(self, model, tokenizer) -> None:
        """Every connectivity row (input embedding, and an untied LM head) = the mean row of its phrase's tokens."""
        inp = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        matrices = [inp] + ([out.weight] if out is not None and out.weight.data_ptr() != inp.data_ptr() else [])
        for k, phrase in enumerate(self.phrases()):
            ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
            for weight in matrices:
                weight[self.first_id + k] = weight[ids].float().mean(0).to(weight.dtype)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, meta: dict | None) -> ConnectivityTokens | None:
        if not meta:
            return None
        return cls(networks=list(meta["networks"]), membership=list(meta["membership"]),
                   pairs=[tuple(p) for p in meta["pairs"]], edges=[list(e) for e in meta["edges"]],
                   first_id=int(meta["first_id"]))


def fit_on_corpus(corpus, bins: int, batch: int = 64, max_scans: int = 4096) -> ConnectivityTokens | None:
    """The spec fitted on the train split of `corpus` (None when bins is 0): on every train scan, or on `max_scans`
    of them spread evenly over the sorted keys (quantiles need no more, and a UK Biobank train split is 30 GB)."""
    if bins == 0:
        return None
    from corpus_builder.readers import open_zarr, read_rois, split_keys

    rois = read_rois(corpus)
    labels = [v if isinstance(v, str) else "" for v in rois["network"]] if "network" in rois else [""] * len(rois)
    keys = split_keys(corpus, "train")
    if len(keys) > max_scans:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, max_scans).round().astype(int)]
    zarr = open_zarr(corpus)
    return ConnectivityTokens.fit((zarr.batch(keys[i:i + batch]) for i in range(0, len(keys), batch)), labels,
                                  bins, source=str(corpus), keys=keys)
