"""Stage 2 training: `train(cfg, inputs, runtime)`, the loop every stage shares (`fmrilm_core.trainer.fit`: step /
validate / checkpoint) with resume as the first thing it does. The same code runs in one process, under torchrun
and inside Ray Train workers (the caller sets up the process-group environment and hands in a `Runtime`); the
DeepSpeed engine, LR schedule, checkpoints and the step itself (`engine_step`) come from `fmrilm_core`, as in
stage 1.

    base LLM (folder or GGUF) --add markers + K brain tokens, rows from the stage-1 codebook--> [LoRA] --> AlignModel
    corpus --ScanBatches--> frozen BrainTokenizer --> codes / features --> F2F + F2T + T2T --> DeepSpeed engine

Under ZeRO-3 the DeepSpeed config is made alive (`HfDeepSpeedConfig`) before the backbone is built, so
`from_pretrained` partitions the weights as it loads them instead of materialising the whole model on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from corpus_builder.lineage import stage_lineage, subject_per_key
from fmrilm_core.checkpoint import config_fingerprint, load_checkpoint, resume_point
from fmrilm_core.engine import build_engine, deepspeed_config, from_rank0, init_distributed, lr_lambda
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import read_lineage
from fmrilm_core.llm import load_causal_lm, load_tokenizer, resolve_llm
from fmrilm_core.runtime import Runtime
from fmrilm_core.trainer import engine_step, fit
from llm_train.config import LLMAlignConfig
from llm_train.connectivity import ConnectivityTokens, fit_on_corpus
from llm_train.data import AlignBatches, CaptionSuffix, TextChunks, encode_scans, held_out_text
from llm_train.evaluate import (
    bigram_table,
    caption_fidelity,
    caption_loss_given_scan,
    constant_claims,
    f2f_accuracy,
    generate,
    most_frequent_codes,
    t2t_perplexity,
)
from llm_train.export import save_aligned
from llm_train.model import AlignModel, BrainFeatureAdapter
from llm_train.vocabulary import BrainVocab, add_brain_tokens, init_brain_rows
from llm_train.zero3 import live_config, modify, peft_on_partitioned
from tokenizer_train.model import BrainTokenizer

NOT_FINGERPRINTED = {"steps", "checkpoint_every", "eval_every", "eval"}


@dataclass(frozen=True)
class AlignInputs:
    """What stage 2 reads and writes: the corpus, the exported stage-1 tokenizer, the output folder."""

    corpus: Path
    tokenizer: Path
    out: Path


def load_brain_tokenizer(directory: Path) -> BrainTokenizer:
    try:
        return BrainTokenizer.from_pretrained(directory).requires_grad_(False)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"brain tokenizer: {err}") from None


def build_model(cfg: LLMAlignConfig, brain_tokenizer: BrainTokenizer, ds_config: dict,
                connectivity: ConnectivityTokens | None = None):
    """(AlignModel, LLM tokenizer, text vocabulary size, the live HfDeepSpeedConfig or None). `connectivity`: the
    fitted connectivity tokens (`connectivity.fit_on_corpus`) the model reads after the codes, or None."""
    tc = brain_tokenizer.config
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices and the feature adapter: a rebuilt model is the same
    tokenizer = load_tokenizer(cfg.base)
    n_text = len(tokenizer)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    live = live_config(ds_config)  # ZeRO-3: must exist while from_pretrained runs, it turns on zero.Init
    backbone = load_causal_lm(cfg.base, torch_dtype=dtype)
    width = backbone.get_input_embeddings().embedding_dim
    if width != tc.llm_dim:
        raise InputError(f"{cfg.base or 'SmolLM2'}: embedding width {width}, but the brain tokenizer was aligned to "
                         f"llm_dim {tc.llm_dim} (train stage 1 against this LLM)")
    n_steps = brain_tokenizer.n_steps
    n_fc = connectivity.n_tokens if connectivity is not None else 0
    prompt = len(tokenizer(cfg.prompt + "\n")["input_ids"])
    longest = 2 + n_steps * tc.n_rois + n_fc + prompt + cfg.max_caption_tokens + 1
    context = getattr(backbone.config, "max_position_embeddings", None)
    if context is not None and longest > context:
        raise InputError(f"{cfg.base or 'SmolLM2'}: a scan sequence is {longest} tokens (W {n_steps} x N {tc.n_rois} "
                         f"+ {n_fc} connectivity tokens + markers + prompt + {cfg.max_caption_tokens} caption "
                         f"tokens), beyond the backbone's context of {context}")
    features = cfg.input_mode == "features"
    vocab = add_brain_tokens(tokenizer, 0 if features else tc.codebook_size)
    if connectivity is not None:
        connectivity = connectivity.add_to(tokenizer)
    backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = backbone.get_input_embeddings().weight
    out_emb = backbone.get_output_embeddings()
    params = [emb] + ([out_emb.weight] if out_emb is not None and out_emb.weight is not emb else [])
    with modify(params):
        init_brain_rows(backbone, vocab, n_text, None if features else brain_tokenizer.codebook.float())
        if connectivity is not None:
            connectivity.init_rows(backbone, tokenizer)
    backbone.config.use_cache = False
    if cfg.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        backbone = _with_lora(cfg, backbone, vocab, n_text, len(tokenizer), live)
    adapter = BrainFeatureAdapter(tc.llm_dim, width, tc.n_rois, tc.codebook_size).to(dtype) if features else None
    model = AlignModel(backbone, vocab, n_steps=n_steps, n_rois=tc.n_rois, codebook_size=tc.codebook_size,
                       input_mode=cfg.input_mode, position_mode=cfg.position_ids, adapter=adapter,
                       weights=cfg.objectives.model_dump(), connectivity=connectivity)
    return model, tokenizer, n_text, live


def _with_lora(cfg: LLMAlignConfig, backbone, vocab: BrainVocab, n_text: int, n_total: int, live=None):
    """LoRA adapters on the backbone, plus the new vocabulary rows trainable (peft's trainable tokens: only those
    rows, in the input embedding and, when it is not tied to it, the LM head)."""
    from peft import LoraConfig, get_peft_model

    new_ids = list(range(n_text, n_total))
    tied = backbone.get_output_embeddings() is None or (
        backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight)
    names = _embedding_names(backbone)
    indices = {names[0]: new_ids} if tied else {names[0]: new_ids, names[1]: new_ids}
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, trainable_token_indices=indices, task_type="CAUSAL_LM")
    # adapters in the base's dtype (peft would make them fp32): DeepSpeed's bf16 optimizer and ZeRO-3's flat
    # partitions expect one dtype across the module
    return peft_on_partitioned(lambda: get_peft_model(backbone, lora, autocast_adapter_dtype=False), backbone, live)


def _embedding_names(backbone) -> tuple[str, str]:
    """Module names (last component) of the input embedding and the LM head."""
    inp, out = backbone.get_input_embeddings(), backbone.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in backbone.named_modules()}
    return names[id(inp)], names.get(id(out), "lm_head")


def train(cfg: LLMAlignConfig, inputs: AlignInputs, runtime: Runtime) -> dict:
    """Train stage 2 on `inputs.corpus` from `inputs.tokenizer`; save the model into `inputs.out`. Returns the final
    validation metrics."""
    corpus, out = Path(inputs.corpus), Path(inputs.out)
    resolve_llm(cfg.base)  # a missing base or one without weights fails here, before anything loads
    brain_tokenizer = load_brain_tokenizer(Path(inputs.tokenizer))
    lineage = stage_lineage("align", corpus, read_lineage(inputs.tokenizer))
    fingerprint = config_fingerprint(cfg, NOT_FINGERPRINTED)
    latest = resume_point(runtime, fingerprint)
    ds_config = deepspeed_config(cfg.deepspeed, micro_batch=cfg.batch_size, grad_clip=cfg.optim.grad_clip,
                                 lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                                 precision=cfg.precision)
    init_distributed()
    connectivity = from_rank0(lambda: fit_on_corpus(corpus, cfg.connectivity_bins))  # reads the train split once
    model, tokenizer, n_text, live = build_model(cfg, brain_tokenizer, ds_config, connectivity)
    connectivity = model.connectivity  # with its place in the vocabulary
    features = cfg.input_mode == "features"
    suffix = CaptionSuffix(tokenizer, cfg.prompt, cfg.max_caption_tokens)
    text = TextChunks(tokenizer, cfg.text_corpus, cfg.t2t_tokens, cfg.seed) if cfg.objectives.t2t > 0 else None
    heldout = held_out_text(cfg.text_corpus)[: cfg.eval.t2t_docs]
    train_data = AlignBatches(corpus, "train", brain_tokenizer, suffix, text, batch_size=cfg.batch_size,
                              features=features, seed=cfg.seed, rank=runtime.rank, world_size=runtime.world_size,
                              subjects=cfg.train_subjects, connectivity=connectivity)
    val_data = AlignBatches(corpus, "val", brain_tokenizer, suffix, None, batch_size=cfg.batch_size,
                            features=features, seed=cfg.seed, connectivity=connectivity)
    reference = ValidationSet(cfg, train_data, val_data, tokenizer, heldout, n_text, corpus)

    torch.manual_seed(cfg.seed)
    engine, state = engine_from(model, cfg, ds_config, latest)
    start = state.get("step", 0)
    base_ppl = state.get("base_perplexity")
    if base_ppl is None:  # the text rows of the untrained model are exactly the base model's distribution
        base_ppl = reference.perplexity(engine.module, engine.device)["t2t_perplexity_text_rows"]
        runtime.log({"val/t2t_perplexity_base": base_ppl}, 0)

    metrics, losses = fit(
        engine, runtime, name="align", steps=cfg.steps, start=start,
        step=lambda step: engine_step(engine, train_data.batch, cfg.seed, step, runtime.rank),
        validate=lambda: reference.validate(engine.module, engine.device) | {"val/t2t_perplexity_base": base_ppl},
        fingerprint=fingerprint, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
        extra={"base_perplexity": base_ppl})
    save_aligned(engine.module, tokenizer, cfg, brain_tokenizer, Path(inputs.tokenizer), corpus, out, runtime.rank,
                 lineage=lineage, config=cfg.model_dump(mode="json"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    del live
    return metrics | {"final_loss": float(losses["loss"]) if losses else float("nan")}


def engine_from(model, cfg, ds_config: dict, latest: Path | None):
    """The DeepSpeed engine over every trainable parameter of `model` (the LR schedule from `cfg.optim` and
    `cfg.steps`), restored from `latest` when there is one; (engine, client state: {} when starting afresh)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr_fn = lr_lambda(warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.steps, schedule=cfg.optim.schedule,
                      min_lr_ratio=cfg.optim.min_lr_ratio)
    engine, _ = build_engine(model, [{"params": trainable}], ds_config, lr_fn)
    return engine, (load_checkpoint(engine, latest) if latest is not None else {})


class ValidationSet:
    """The fixed val material (encoded once) and what validation computes from it (`evaluate.py`)."""

    def __init__(self, cfg: LLMAlignConfig, train: AlignBatches, val: AlignBatches, tokenizer, heldout: list[str],
                 n_text: int, corpus: Path):
        self.cfg, self.tokenizer, self.heldout, self.n_text = cfg, tokenizer, heldout, n_text
        keys = val.scans.keys[: cfg.eval.scans]
        b = cfg.batch_size
        self.batches = [val.scans_of(keys[i:i + b]) for i in range(0, len(keys), b)]
        train_keys = train.scans.keys[:256]
        train_codes = torch.cat([train.scans_of(train_keys[i:i + 32])["codes"] for i in range(0, len(train_keys), 32)])
        self.frequent = most_frequent_codes(train_codes)
        self.bigram = bigram_table(train_codes, train.brain_tokenizer.config.codebook_size)
        self.constant = constant_claims([train.scans.caption_of[k] for k in train.scans.keys])
        self.caption_keys = val.scans.keys[: cfg.eval.caption_scans]
        self.captions = [val.scans.caption_of[k] for k in self.caption_keys]
        self.subjects = subject_per_key(corpus, self.caption_keys)  # the bootstrap's groups
        unknown = sorted(set(cfg.eval.claims or ()) - {name for name, _ in self.constant})
        if unknown:
            raise InputError(f"align.eval.claims: {', '.join(unknown)} is no claim of {corpus}'s train captions")
        self.caption_batches = [val.scans_of(self.caption_keys[i:i + 4]) for i in range(0, len(self.caption_keys), 4)]
        # teacher-forced, one scan at a time: the same encoded scans, not encoded again
        self.caption_scans = [{k: v[i:i + 1] for k, v in b.items()}
                              for b in self.caption_batches for i in range(len(b["codes"]))]
        self.caption_suffixes = [val.suffix([c]) for c in self.captions]
        self.prompt_ids = tokenizer(cfg.prompt + "\n", add_special_tokens=False)["input_ids"]

    def perplexity(self, model: AlignModel, device) -> dict[str, float]:
        return t2t_perplexity(model, self.tokenizer, self.heldout, self.n_text, device=device)

    @torch.no_grad()
    def validate(self, model: AlignModel, device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        on = [{k: v.to(device) for k, v in batch.items()} for batch in self.batches]
        out = f2f_accuracy(model, on, self.frequent.to(device), self.bigram) if self.cfg.objectives.f2f > 0 else {}
        generated = []
        for batch in self.caption_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            for ids in generate(model, batch, self.prompt_ids, self.cfg.eval.max_new_tokens,
                                self.tokenizer.eos_token_id):
                generated.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        out |= caption_fidelity(generated, self.captions, self.constant, self.cfg.seed, groups=self.subjects)
        if self.cfg.eval.claims is not None:
            out |= {k.replace("caption_fidelity", "caption_fidelity_recoverable"): v for k, v in caption_fidelity(
                generated, self.captions, self.constant, self.cfg.seed, self.cfg.eval.claims, self.subjects).items()
                if k.startswith("caption_fidelity")}
        out |= caption_loss_given_scan(
            model.f2t_loss, [{k: v.to(device) for k, v in b.items()} for b in self.caption_scans],
            [{k: v.to(device) for k, v in b.items()} for b in self.caption_suffixes], self.subjects, self.cfg.seed)
        out |= self.perplexity(model, device)
        self.last_generated = generated
        model.train(was_training)
        return {f"val/{k}": v for k, v in out.items()}


__all__ = ["AlignInputs", "build_model", "encode_scans", "train"]
