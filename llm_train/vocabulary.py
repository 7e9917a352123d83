"""The brain vocabulary: K tokens `<|brain_k|>` (one per stage-1 code) and the scan markers, added to an LLM.

The new input rows start from the stage-1 codebook *in the LLM's embedding space* (`BrainTokenizer.codebook`, the
export's `to_llm` projection applied to the codes). That is the space the domain-adversarial loss of stage 1 pulled
the codes towards, so a brain token starts where the LLM already reads text, instead of at a random row the LLM
has never seen. The codebook is placed by one affine map that keeps its geometry: centred on the text rows' mean
and scaled so its spread (RMS distance from its mean) equals the text rows' spread *within the codes' span* (the
codes reach at most a code_dim-wide subspace; stage 1's classifier compares the domains there too, see
`LLMProjection.text_view`). A codebook that stage 1 had aligned perfectly (the text's mean and spread) is left as
it is; one that sits off to the side, e.g. along the to_llm bias, is brought to where text rows are. Measured on
SmolLM2 before any step: left as exported (rescaled to the text's norm), the 512 rows took most of the
next-token mass from the text (T2T loss 6.4 against the base model's 3.7; F2F cross-entropy 27 against
ln K = 6.2); matched to the text's *total* spread they still did (4.8 and 16), since that spread squeezed into 32
of 576 dimensions is 18 times the text's per dimension.

Output rows get the same codebook the same way (tied embeddings share the rows anyway; an untied head is placed
among its own text rows), so predicting code k starts as "which code is this hidden state closest to". The
markers start at the mean text row.
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
    """Resized `model`'s new rows: brain rows from `codebook` [K, d] (centred and scaled onto the text rows, see
    module doc), markers at the mean text row. `n_text` = the vocabulary size before the markers were added.
    Returns the scale applied."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    matrices = [inp] + ([out.weight] if out is not None and out.weight.data_ptr() != inp.data_ptr() else [])
    for weight in matrices:  # every new row is set here: none keeps resize's random values
        weight[vocab.scan_start] = weight[:n_text].float().mean(0).to(weight.dtype)
        weight[vocab.scan_end] = weight[vocab.scan_start]
    scale = 1.0
    if codebook is not None and vocab.size:
        if codebook.shape != (vocab.size, inp.shape[1]):
            raise ValueError(f"codebook {tuple(codebook.shape)} does not fit {vocab.size} brain rows of width "
                             f"{inp.shape[1]}")
        for weight in matrices:  # an untied LM head is placed among its own text rows
            text = weight[:n_text].float()
            codes = codebook.float().to(text.device)
            text_mean, code_mean = text.mean(0), codes.mean(0)
            centred = codes - code_mean
            # the span of the codes (at most code_dim wide): the text's spread is measured inside it
            u, sv, vh = torch.linalg.svd(centred, full_matrices=False)
            basis = vh[sv > sv[0] * 1e-5].T
            text_spread = ((text - text_mean) @ basis).pow(2).sum(1).mean().sqrt()
            factor = float(text_spread / centred.pow(2).sum(1).mean().sqrt().clamp_min(1e-8))
            rows = text_mean + factor * centred
            weight[vocab.first_id: vocab.first_id + vocab.size] = rows.to(device=weight.device, dtype=weight.dtype)
            scale = factor if weight is inp else scale
    return scale
