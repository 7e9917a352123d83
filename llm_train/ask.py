"""Answer a question about one scan with a saved stage-2/3 model folder (`fmrilm ask`).

The scan is X [T, N], cleaned as the corpus builder cleans it (the caller reads it from a corpus or cleans a file
with `corpus_builder.sources.tables.clean_file`); the folder's own copy of the brain tokenizer encodes it, and the
answer is a greedy continuation of `scan + question`, in the prompt format the folder was trained with. A question
that names its answers ("Is this subject male or female?", `choices_in`) is answered by scoring each of them as
`fmrilm eval` scores a task's options (`BrainReader.choose`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fmrilm_core.errors import InputError
from llm_train.data import encode_scans
from llm_train.evaluate import generate
from llm_train.export import load_aligned

_ALTERNATIVE = r"(?:(?:a|an|the)\s+)?[\w'-]+"  # one word, perhaps after an article
# the text after the last ':' or '?' that has text after it, up to the closing punctuation: "…: yes or no?"
_TAIL = re.compile(r"([:?])\s*([^:?.]*[^\s:?.!])[\s?.!]*$")
# one-word alternatives ending the question: "… male or female?", "… a male, a female or other?"
_ENDS_IN_OR = re.compile(rf"((?:{_ALTERNATIVE},\s*)*{_ALTERNATIVE})\s+or\s+({_ALTERNATIVE})[\s?.!]*$", re.I)
_SEPARATOR = re.compile(r"\s*,\s*(?:or\s+)?|\s+or\s+", re.I)
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.I)
# an item opening like a question is a clause, not an answer ("Note: is it male or female?", "If so, which one?")
_CLAUSE = re.compile(r"^(?:is|are|was|were|do|does|did|can|could|will|would|should|which|what|who|how|why|if)\b",
                     re.I)
MAX_CHOICE_WORDS = 4  # "autism spectrum disorder" is 3; a longer item is a sentence, not an answer


def choices_in(question: str) -> list[str] | None:
    """The answers a question names, to be scored instead of generated; None when it names none.

    Two ways of naming them are read, each giving two or more answers of at most MAX_CHOICE_WORDS words, as
    written but for a leading article ("a male" -> "male"), none opening like a question ("is", "which", "if"):

    - a list closing the question after a colon or after its question mark, joined by commas and/or "or":
      "Does this scan show ADHD: yes or no?", "Which sex is this subject: female, male?", "Answer with one of:
      control, ADHD.", and a task's question followed by its options, "Sex? Female or Male", "Diagnosis? no
      diagnosis or ADHD". A list with no "or" counts after a colon only, and only in a question (ending in '?')
      or after "one of": "Describe this scan: networks, coupling." and "Diagnosis? If so, which one?" name none.
    - one-word alternatives (perhaps after an article) joined by commas and "or", ending the question: "Is this
      subject male or female?", "Is it a male, a female or other?".

    "Describe this scan.", "Sex?" or "Describe it in one or two sentences." name none. Alternatives inside the
    question ("Is this scan from a male or a female participant?") are not read: name them with `--choices`.
    """
    q = question.strip()
    tail = _TAIL.search(q)
    if tail is not None:
        separator, listed = tail.groups()
        joined_by_or = re.search(r"\bor\b", listed, re.I) is not None
        comma_list = separator == ":" and (q.endswith("?") or "one of" in q.lower())
        items = _answers(_SEPARATOR.split(listed)) if joined_by_or or comma_list else None
        if items is not None:
            return items
    inline = _ENDS_IN_OR.search(q)
    return _answers([*inline.group(1).split(","), inline.group(2)]) if inline is not None else None


def _answers(parts: list[str]) -> list[str] | None:
    answers = list(dict.fromkeys(_ARTICLE.sub("", p.strip()) for p in parts if p.strip()))
    if len(answers) < 2 or any(len(a.split()) > MAX_CHOICE_WORDS or _CLAUSE.match(a) for a in answers):
        return None
    return answers


class BrainReader:
    """A loaded model folder that answers questions about scans."""

    def __init__(self, directory: Path, device: str = "cpu"):
        self.directory = Path(directory)
        self.model, self.tokenizer, self.brain_tokenizer, self.meta = load_aligned(self.directory, device)
        self.device = device

    def check_corpus(self, corpus: Path, key: str) -> str:
        """Before answering about the scan `key` of `corpus`: the corpus's test subjects must not be training
        subjects of any stage of the model's lineage (else its split assignment is not the model's: one-line error).
        Returns a note when the scan's own subject was trained on (its answer is then no held-out figure)."""
        from corpus_builder.lineage import corpus_fingerprint, split_subjects, subjects_of_keys
        from fmrilm_core.lineage import STAGE_NAMES, chain, check_subjects, read_lineage

        lineage = read_lineage(self.directory)
        fingerprint = corpus_fingerprint(corpus)
        check_subjects(lineage, fingerprint, split_subjects(corpus, "test"), "test")
        subject = subjects_of_keys(corpus, [key])
        seen = [STAGE_NAMES.get(s["stage"], s["stage"]) for s in chain(lineage)
                if s["corpus"].get("pseudonym_scheme") == fingerprint["pseudonym_scheme"]
                and subject & set(s.get("trained_subjects", []))]
        return f"(this scan's subject was in the training data of {', '.join(seen)})" if seen else ""

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
                             self.meta["input_mode"] == "features", self.model.connectivity)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        probs = option_probabilities(self.model, self.tokenizer, batch, question, choices,
                                     prompt_format=self.meta.get("prompt_format", "plain"))[0]
        return dict(sorted(zip(choices, probs.tolist()), key=lambda kv: -kv[1]))

    @torch.no_grad()
    def ask(self, x: np.ndarray, question: str, max_new_tokens: int = 160, labels: list[str] | None = None) -> str:
        self.check(x, labels)
        batch = encode_scans(self.brain_tokenizer, torch.as_tensor(x, dtype=torch.float32)[None],
                             self.meta["input_mode"] == "features", self.model.connectivity)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = generate(self.model, batch, self.prompt_ids(question), max_new_tokens, self.tokenizer.eos_token_id)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
