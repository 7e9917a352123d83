"""Answer a question about one scan with a saved stage-2/3 model folder (`fmrilm ask`).

The scan is X [T, N], cleaned as the corpus builder cleans it (the caller reads it from a corpus or cleans a file
with `corpus_builder.sources.tables.clean_file`); the folder's own copy of the brain tokenizer encodes it, and the
answer is a greedy continuation of `scan + question`, in the prompt format the folder was trained with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmrilm_core.errors import InputError
from llm_train.data import encode_scans
from llm_train.evaluate import generate
from llm_train.export import load_aligned


class BrainReader:
    """A loaded model folder that answers questions about scans."""

    def __init__(self, directory: Path, device: str = "cpu"):
        self.model, self.tokenizer, self.brain_tokenizer, self.meta = load_aligned(Path(directory), device)
        self.device = device

    def check(self, x: np.ndarray, labels: list[str] | None = None) -> None:
        shape = (self.meta["length"], self.meta["n_rois"])
        if tuple(x.shape) != shape:
            raise InputError(f"scan is T={x.shape[0]} x N={x.shape[1]}, the model reads T={shape[0]} x N={shape[1]}")
        if labels is not None:
            from llm_train.export import labels_signature

            if labels_signature(labels) != self.meta["atlas"]["labels_sha256"]:
                raise InputError("the scan's ROI labels are not the atlas the model was trained on")

    def prompt_ids(self, question: str) -> list[int]:
        if self.meta.get("prompt_format") == "chat":  # a stage-3 folder: asked in the chat template it learnt
            from llm_train.scoring import question_ids

            return question_ids(self.tokenizer, question, "chat")
        return self.tokenizer(question.strip() + "\n", add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def choose(self, x: np.ndarray, question: str, choices: list[str],
               labels: list[str] | None = None) -> dict[str, float]:
        """{choice: probability}: every choice scored by its log-likelihood after `scan + question`, as `fmrilm eval`
        scores answer options (`llm_train.scoring.option_probabilities`), most probable first."""
        from llm_train.scoring import option_probabilities

        self.check(x, labels)
        choices = [c.strip() for c in choices if c.strip()]
        if len(choices) < 2:
            raise InputError(f"--choices: name at least two answers, got {choices}")
        batch = encode_scans(self.brain_tokenizer, torch.as_tensor(x, dtype=torch.float32)[None],
                             self.meta["input_mode"] == "features")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        probs = option_probabilities(self.model, self.tokenizer, batch, question, choices,
                                     prompt_format=self.meta.get("prompt_format", "plain"))[0]
        return dict(sorted(zip(choices, probs.tolist()), key=lambda kv: -kv[1]))

    @torch.no_grad()
    def ask(self, x: np.ndarray, question: str, max_new_tokens: int = 160, labels: list[str] | None = None) -> str:
        self.check(x, labels)
        batch = encode_scans(self.brain_tokenizer, torch.as_tensor(x, dtype=torch.float32)[None],
                             self.meta["input_mode"] == "features")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = generate(self.model, batch, self.prompt_ids(question), max_new_tokens, self.tokenizer.eos_token_id)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
