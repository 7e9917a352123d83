"""Stage 1: the text-aligned brain tokenizer (DESIGN 1, 3.5).

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
