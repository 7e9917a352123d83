"""Stage 1: the text-aligned brain tokenizer (docs/design.md).

    config.py      typed configs of stage 1 (TokenizerTrainConfig: model, losses, text side, optimiser)
    model.py       BrainTokenizer: X [T, N] -> patches -> encoder -> codes [W, N] -> the LLM's space; decoder -> X_hat
    quantizer.py   the vector quantiser: cosine lookup, straight-through gradients, EMA codebook, dead-code restarts
    losses.py      the domain-adversarial (DANN) and SigLIP losses that pull the latents towards language
    text.py        the frozen language side: the target LLM's token embeddings and the caption encoder
    data.py        deterministic batches from the corpus readers (split keys, zarr by key, captions)
    engine.py      Stage1 (everything stage 1 trains), its parameter groups and DeepSpeed engine, one optimiser step
    train.py       train(cfg, TokenizerInputs, runtime): the loop, resume first, checkpoints, validation
    export.py      the exported tokenizer folder (config.json + model.safetensors) and its loader
    data/          english_text.txt, the offline default text whose token frequencies `text.py` samples by

Imports the corpus package (its readers) and fmrilm_core among the project's packages; never a later stage or
`cluster`, ray or mlflow.

Import-light on purpose: an exported tokenizer loads with this package alone
(`from tokenizer_train import BrainTokenizer; BrainTokenizer.from_pretrained(DIR)`), and reading a config does
not pull in torch. Never import deepspeed, ray or mlflow here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizer_train.model import BrainTokenizer, TokenizerOutput

__all__ = ["BrainTokenizer", "TokenizerOutput"]


def __getattr__(name: str):
    if name in __all__:
        from tokenizer_train import model

        return getattr(model, name)
    raise AttributeError(f"module 'tokenizer_train' has no attribute {name!r}")
