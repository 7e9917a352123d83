"""The exported brain tokenizer (docs/design.md): DIR/config.json + DIR/model.safetensors.

config.json = {"format": "fmrilm-brain-tokenizer", "format_version": 1, "config": <TokenizerModelConfig>}.
model.safetensors holds every parameter and buffer, the codebook and its EMA state included, so a loaded
tokenizer can be used as is or trained further. Loading needs only this package (torch, safetensors, pydantic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenizer_train.config import TokenizerModelConfig

FORMAT = "fmrilm-brain-tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write config.json and model.safetensors into `directory` (each file replaced atomically); floating-point
    weights are saved in fp32 whatever the training precision (a bf16 GPU run exports like a CPU one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.config.roi_embedding == "gradients" and model.roi_gradients is None:
        raise ValueError("cannot export a tokenizer with roi_embedding='gradients' before set_roi_gradients")
    state = {name: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous()
             for name, t in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.model_dump(mode="json")}
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(state, tmp, metadata={"format": "pt", "fmrilm_format_version": str(FORMAT_VERSION)})
    os.replace(tmp, directory / WEIGHTS_FILE)
    tmp = directory / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def read_config(directory: str | Path) -> TokenizerModelConfig:
    """The validated model config of an exported tokenizer; ValueError / FileNotFoundError say what is wrong."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a brain tokenizer directory holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (written by BrainTokenizer.save_pretrained)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a brain tokenizer config (expected \"format\": \"{FORMAT}\")")
    if set(raw) != {"format", "format_version", "config"}:
        raise ValueError(f"{path}: expected the keys format, format_version, config; got {sorted(raw)}")
    if raw["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {raw['format_version']!r} is not supported "
                         f"(this code reads version {FORMAT_VERSION})")
    try:
        return TokenizerModelConfig.model_validate(raw["config"])
    except ValidationError as e:
        raise ValueError(f"{path}: invalid tokenizer config:\n{e}") from e


def load_pretrained(model_cls: type[torch.nn.Module], directory: str | Path,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load an exported tokenizer as a `model_cls` (in eval mode) onto `device`, checking the weights against the
    config (`BrainTokenizer.from_pretrained`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no brain tokenizer at {directory}: not a directory")
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (the weights written by BrainTokenizer.save_pretrained)")
    with safe_open(weights, framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    gradients = None
    if config.roi_embedding == "gradients" and "roi_gradients" in found:
        gradients = torch.zeros(found["roi_gradients"])  # shape only; the values come with the state below
    model = model_cls(config, roi_gradients=gradients)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = [f"missing {name}" for name in expected.keys() - found.keys()]
    problems += [f"unexpected {name}" for name in found.keys() - expected.keys()]
    problems += [f"{name}: {found[name]} in the file, {shape} from the config"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    if problems:
        raise ValueError(f"{weights} does not match {directory / CONFIG_FILE}: " + "; ".join(sorted(problems)))
    model.load_state_dict(load_file(weights, device="cpu"))
    return model.to(device).eval()
