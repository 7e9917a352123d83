"""The brain vocabulary: K tokens `<|brain_k|>` (one per stage-1 code) and the scan markers, added to an LLM.

The new input rows start from the stage-1 codebook *in the LLM's embedding space* (`BrainTokenizer.codebook`, the
export's `to_llm` projection applied to the codes). That is the space the domain-adversarial loss of stage 1 pulled
the codes towards, so a brain token starts where the LLM already reads text, instead of at a random row the LLM
has never seen. The rows are rescaled by one scalar so their mean norm matches the text rows' (the direction is
what stage 1 aligned; a scale far from the text's would dominate or vanish in the residual stream). Output rows get
the same vectors (tied embeddings share them anyway), so predicting code k starts as "which code is this hidden
state closest to". The markers start at the mean text embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SCAN_START = "<|scan_start|>"
SCAN_END = "<|scan_end|>"


def brain_token(k: int) -> str:
    return f"<|brain_{k}|>"


@dataclass(frozen=True)
class BrainVocab:
    """Where the brain tokens sit in the extended vocabulary: ids first_id .. first_id + size - 1 are codes 0..K-1."""

    first_id: int
    size: int
    scan_start: int
    scan_end: int

    def ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.long() + self.first_id

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.long() - self.first_id

    def to_json(self) -> dict:
        return asdict(self)


def add_brain_tokens(tokenizer, codebook_size: int) -> BrainVocab:
    """Add the markers and `codebook_size` brain tokens (K = 0 in the features mode: markers only) to `tokenizer`.

    Special tokens: never split, and dropped by `decode(skip_special_tokens=True)`. Ids are checked contiguous,
    since the code <-> id map is an offset.
    """
    tokenizer.add_tokens([SCAN_START, SCAN_END], special_tokens=True)
    names = [brain_token(k) for k in range(codebook_size)]
    if names:
        tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names) if names else []
    first = ids[0] if ids else len(tokenizer)
    if ids != list(range(first, first + codebook_size)):
        raise ValueError("the tokenizer already holds some <|brain_k|> tokens out of order; start from a base model")
    if tokenizer.pad_token is None:  # F2T batches are padded; loss and attention ignore the padding
        tokenizer.pad_token = tokenizer.eos_token
    return BrainVocab(first_id=first, size=codebook_size, scan_start=tokenizer.convert_tokens_to_ids(SCAN_START),
                      scan_end=tokenizer.convert_tokens_to_ids(SCAN_END))


@torch.no_grad()
def init_brain_rows(model, vocab: BrainVocab, n_text: int, codebook: torch.Tensor | None) -> float:
    """Resized `model`'s new rows: brain rows from `codebook` [K, d] (rescaled, see module doc), markers at the
    mean text row. `n_text` = the vocabulary size before the markers were added. Returns the scale applied."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    matrices = [inp] + ([out.weight] if out is not None and out.weight.data_ptr() != inp.data_ptr() else [])
    mean_norm = inp[:n_text].float().norm(dim=1).mean()
    for weight in matrices:  # every new row is set here: none keeps resize's random values
        weight[vocab.scan_start] = weight[:n_text].float().mean(0).to(weight.dtype)
        weight[vocab.scan_end] = weight[vocab.scan_start]
    scale = 1.0
    if codebook is not None and vocab.size:
        if codebook.shape != (vocab.size, inp.shape[1]):
            raise ValueError(f"codebook {tuple(codebook.shape)} does not fit {vocab.size} brain rows of width "
                             f"{inp.shape[1]}")
        scale = float(mean_norm / codebook.float().norm(dim=1).mean().clamp_min(1e-8))
        rows = codebook.float() * scale
        for weight in matrices:
            weight[vocab.first_id: vocab.first_id + vocab.size] = rows.to(device=weight.device, dtype=weight.dtype)
    return scale
