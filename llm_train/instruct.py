"""Stage 3, instruction tuning (`fmrilm llm instruct`): a stage-2 model folder learns to answer the corpus's
instruction items (`qa.json`: single-turn QA, multi-turn, multi-target, open-ended descriptions).

    <|scan_start|> scan <|scan_end|> chat(turns)        loss on the assistant turns only

The conversation is rendered with the backbone's chat template (the stage-2 folder always has one), segment by
segment: each user turn up to and including the assistant header is context, each assistant turn (its text and the
template's end-of-turn) is target. The loss is stage 2's F2T loss (`AlignModel.f2t_loss`: scan, then a suffix
whose labels mark what is learnt), so the model, the DeepSpeed engine, checkpoints and resume are stage 2's, and
the loop and its step are the ones every stage shares (`fmrilm_core.trainer`).

Full or LoRA: a LoRA stage-2 folder is merged into its base first; with `lora.enabled` fresh adapters (and the
brain rows, as in stage 2) are trained and merged again before saving, so the stage-3 folder is a plain
`AutoModelForCausalLM` folder.

ZeRO 0-3, as in stage 2 (`llm_train.zero3`): under ZeRO-3 the DeepSpeed config is alive before the stage-2 folder
loads, so `from_pretrained` partitions its weights; merges run on gathered weights, and saving gathers them.
Attributes in `exclude_attributes` are left out of the tuning mix (the zero-shot protocol of `fmrilm eval`): out of
every item, not only the items that ask about them (`select_items`; a description's phenotype sentence is rebuilt
without them). brain.json's `instruct.trained_attributes` records what the trained items did teach (`item_attributes`).
"""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corpus_builder.instructions import item_attributes, without_attributes
from corpus_builder.lineage import stage_lineage
from corpus_builder.readers import open_zarr, read_captions, read_instructions, read_phenotypes
from fmrilm_core.checkpoint import config_fingerprint, resume_point
from fmrilm_core.engine import deepspeed_config, init_distributed
from fmrilm_core.errors import InputError
from fmrilm_core.lineage import folder_digest, read_lineage
from fmrilm_core.runtime import Runtime
from fmrilm_core.trainer import engine_step, fit
from llm_train.config import InstructConfig
from llm_train.data import encode_scans
from llm_train.export import check_atlas, load_aligned, save_aligned
from llm_train.model import IGNORE, AlignModel
from llm_train.train import engine_from
from llm_train.zero3 import live_config, merged

NOT_FINGERPRINTED = {"steps", "checkpoint_every", "eval_every", "eval_items"}


@dataclass(frozen=True)
class InstructInputs:
    model: Path    # the stage-2 folder
    corpus: Path
    out: Path
    items: tuple | None = None  # ((train scan key, turns), ...) to learn instead of the corpus's qa.json (train_n)


class ChatFormat:
    """Turns -> (ids, labels): user turns and assistant headers are context (IGNORE), assistant turns targets."""

    def __init__(self, tokenizer):
        if tokenizer.chat_template is None:
            raise InputError("the model folder's tokenizer has no chat template")
        self.tokenizer = tokenizer

    def _render(self, turns: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)

    def encode(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for k, turn in enumerate(turns):
            if turn["role"] == "user":
                text = self._render(turns[: k + 1], True)
                target = False
            else:
                text = self._render(turns[: k + 1], False)
                target = True
            if not text.startswith(done):
                raise InputError("the chat template is not prefix-stable: a conversation cannot be split into turns")
            piece = self.tokenizer(text[len(done):], add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if target else [IGNORE] * len(piece)
            done = text
        return ids, labels


def select_items(items: dict[str, list[dict]], types, exclude, context=None) -> list[tuple[str, dict]]:
    """The tuning mix: (scan key, item) of every item of `types` in `items` ({key: qa.json items}), sorted by key,
    each rewritten without the `exclude` attributes (`corpus_builder.instructions.without_attributes`: gone from
    every turn, items left with none dropped). `context()`: ({key: phenotypes}, {key: caption}), called once and only
    when a description item predates the stored caption / context (a corpus built before them)."""
    exclude = set(exclude)
    loaded = None
    out = []
    for key in sorted(items):
        for item in items[key]:
            if item["type"] not in types:
                continue
            pheno = caption = None
            if item["type"] == "description" and not ("caption" in item and "context" in item):
                if context is None:
                    raise InputError(f"scan {key}: a description item without its caption and context, and no "
                                     "phenotypes and captions to rebuild it from")
                loaded = loaded if loaded is not None else context()
                pheno, caption = loaded[0][key], loaded[1][key]
            kept = without_attributes(item, exclude, pheno, caption)
            if kept is not None:
                out.append((key, kept))
    return out


def tuning_mix(corpus: Path, split: str, types, exclude) -> list[tuple[str, dict]]:
    """`select_items` on the split's qa.json items; phenotypes and captions are read only for an old corpus."""
    def context() -> tuple[dict, dict]:
        pheno = read_phenotypes(corpus, split)
        return {k: row.to_dict() for k, row in pheno.iterrows()}, read_captions(corpus, split)

    return select_items(read_instructions(corpus, split), types, exclude, context)


def trained_attributes(items: list[tuple[str, dict]]) -> list[str]:
    """Sorted attributes (sex, age, fluid_intelligence, diagnosis) that any of the (key, item) pairs teaches
    (`corpus_builder.instructions.item_attributes`)."""
    return sorted(set().union(*(item_attributes(item) for _, item in items)))


def lineage_attributes(items: list[tuple[str, dict]] | None, meta: dict) -> list[str] | None:
    """brain.json's `instruct.trained_attributes`: the attributes the items of this run taught, with those its input
    folder had been tuned on when that is a stage-3 folder itself (the weights saw both). None when unknown: the run
    learnt given (key, turns) pairs that carry no attribute, or its input folder's record is unknown."""
    if items is None:
        return None
    before = meta.get("instruct", {}).get("trained_attributes") if meta.get("stage") == "instruct" else []
    if before is None:  # a stage-3 input saved before this record, or tuned on given pairs itself
        return None
    return sorted(set(trained_attributes(items)) | set(before))


class InstructBatches:
    """(scan key, turns) pairs of a split; batch `step` of rank `r` depends only on (seed, step, rank)."""

    def __init__(self, corpus: Path, split: str, brain_tokenizer, chat: ChatFormat, cfg: InstructConfig,
                 features: bool, rank: int = 0, world_size: int = 1, examples: tuple | None = None,
                 connectivity=None):
        exclude = set(cfg.exclude_attributes)
        self.items: list[tuple[str, dict]] | None = None  # the qa.json items trained on (None for given pairs)
        if examples is not None:  # given (key, turns) pairs, e.g. the N subjects of few-shot fine-tuning
            self.examples = [(key, list(turns)) for key, turns in examples]
        else:  # excluded attributes leave every item, descriptions included: a zero-shot task is never in the mix
            self.items = tuning_mix(corpus, split, cfg.types, exclude)
            self.examples = [(key, item["turns"]) for key, item in self.items]
        if not self.examples:
            raise InputError(f"{corpus}: no instruction items of types {cfg.types} in the {split} split "
                             f"(excluding {sorted(exclude)})")
        self.zarr = open_zarr(corpus)
        self.brain_tokenizer, self.chat, self.cfg, self.features = brain_tokenizer, chat, cfg, features
        self.connectivity = connectivity  # the model's connectivity tokens, or None
        self.rank, self.world_size = rank, world_size
        self.order = np.random.default_rng([cfg.seed, 11]).permutation(len(self.examples))
        self.pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else \
            chat.tokenizer.eos_token_id

    def rows(self, picks: list[int]) -> dict[str, torch.Tensor]:
        keys = [self.examples[p][0] for p in picks]
        x = torch.from_numpy(np.asarray(self.zarr.batch(keys), np.float32))
        out = encode_scans(self.brain_tokenizer, x, self.features, self.connectivity)
        encoded = [self.chat.encode(self.examples[p][1]) for p in picks]
        encoded = [(i[: self.cfg.max_tokens], lab[: self.cfg.max_tokens]) for i, lab in encoded]
        longest = max(len(i) for i, _ in encoded)
        out["suffix_ids"] = torch.full((len(picks), longest), self.pad, dtype=torch.long)
        out["suffix_labels"] = torch.full((len(picks), longest), IGNORE, dtype=torch.long)
        out["suffix_mask"] = torch.zeros(len(picks), longest, dtype=torch.long)
        for r, (ids, labels) in enumerate(encoded):
            out["suffix_ids"][r, : len(ids)] = torch.tensor(ids)
            out["suffix_labels"][r, : len(ids)] = torch.tensor(labels)
            out["suffix_mask"][r, : len(ids)] = 1
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        b = self.cfg.batch_size
        start = (step * self.world_size + self.rank) * b
        return self.rows([int(self.order[(start + i) % len(self.examples)]) for i in range(b)])


def prepare_model(cfg: InstructConfig, model: AlignModel, n_tokens: int, live=None) -> AlignModel:
    """The stage-2 model made trainable for stage 3: a LoRA folder merged; fresh LoRA (+ brain rows) or all weights.
    `live`: the live HfDeepSpeedConfig of a ZeRO-3 run (None otherwise)."""
    from llm_train.train import _with_lora

    backbone = merged(model.backbone)
    v = model.vocab
    n_text = min(v.scan_start, v.scan_end, v.first_id)
    if cfg.lora.enabled:
        backbone = _with_lora(types.SimpleNamespace(lora=cfg.lora), backbone, v, n_text, n_tokens, live)
    else:
        backbone.requires_grad_(True)
    backbone.config.use_cache = False
    model.backbone = backbone
    model.weights = {"f2f": 0.0, "f2t": 1.0, "t2t": 0.0}
    return model.train()


@torch.no_grad()
def answer_loss(model: AlignModel, batches: list[dict], device) -> float:
    was = model.training
    model.eval()
    total = [float(model.f2t_loss({k: v.to(device) for k, v in b.items()})) for b in batches]
    model.train(was)
    return float(np.mean(total))


def train(cfg: InstructConfig, inputs: InstructInputs, runtime: Runtime) -> dict:
    """Instruction-tune the stage-2 folder `inputs.model` on `inputs.corpus`'s train items; save into `inputs.out`.
    Returns the final val answer loss (and the one before training)."""
    model_dir, corpus, out = Path(inputs.model), Path(inputs.corpus), Path(inputs.out)
    meta = check_atlas(model_dir, corpus)
    lineage = stage_lineage("fine_tune" if inputs.items is not None else "instruct", corpus, read_lineage(model_dir),
                            keys=None if inputs.items is None else [key for key, _ in inputs.items])
    # another input model, corpus or training set is another run: never resume one from the other
    fingerprint = "-".join([config_fingerprint(cfg, NOT_FINGERPRINTED), folder_digest(model_dir),
                            lineage["corpus"]["splits_sha256"]])
    if inputs.items is not None:
        digest = hashlib.sha256(json.dumps(inputs.items, sort_keys=True).encode()).hexdigest()[:16]
        fingerprint = f"{fingerprint}-{digest}"
    latest = resume_point(runtime, fingerprint)
    ds_config = deepspeed_config(cfg.deepspeed, micro_batch=cfg.batch_size, grad_clip=cfg.optim.grad_clip,
                                 lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                                 precision=cfg.precision)
    init_distributed()
    live = live_config(ds_config)  # ZeRO-3: alive before the stage-2 folder loads, so its weights load partitioned
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    model, tokenizer, brain_tokenizer, meta = load_aligned(model_dir, "cpu", dtype, live=live)
    brain_tokenizer.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model = prepare_model(cfg, model, len(tokenizer), live)
    chat = ChatFormat(tokenizer)
    features = meta["input_mode"] == "features"
    train_data = InstructBatches(corpus, "train", brain_tokenizer, chat, cfg, features, runtime.rank,
                                 runtime.world_size, examples=inputs.items, connectivity=model.connectivity)
    val_data = InstructBatches(corpus, "val", brain_tokenizer, chat, cfg.model_copy(update={"batch_size": 4}),
                               features, connectivity=model.connectivity)
    picks = list(range(min(cfg.eval_items, len(val_data.examples))))
    val_batches = [val_data.rows(picks[i:i + 4]) for i in range(0, len(picks), 4)]
    engine, state = engine_from(model, cfg, ds_config, latest)
    start = state.get("step", 0)
    before = state.get("answer_loss_before")
    if before is None:
        before = answer_loss(engine.module, val_batches, engine.device)
        runtime.log({"val/answer_loss_before": before}, 0)
    metrics, _ = fit(
        engine, runtime, name="instruct", steps=cfg.steps, start=start,
        step=lambda step: engine_step(engine, train_data.batch, cfg.seed, step, runtime.rank),
        validate=lambda: {"val/answer_loss": answer_loss(engine.module, val_batches, engine.device),
                          "val/answer_loss_before": before},
        fingerprint=fingerprint, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
        extra={"answer_loss_before": before}, logged=lambda losses: {"train/answer_loss": float(losses["loss"])})
    final = engine.module
    final.backbone = merged(final.backbone)  # every rank: under ZeRO-3 the merge gathers the weights
    shim = types.SimpleNamespace(base=meta.get("base"), prompt=meta.get("prompt"))
    save_aligned(final, tokenizer, shim, brain_tokenizer, model_dir / meta["brain_tokenizer"], corpus, out,
                 runtime.rank, stage="instruct",
                 extra={"prompt_format": "chat", "lora": False, "aligned_from": str(model_dir.resolve()),
                        "instruct": {"types": list(cfg.types), "exclude_attributes": list(cfg.exclude_attributes),
                                     "trained_attributes": lineage_attributes(train_data.items, meta),
                                     "lora": cfg.lora.enabled, "steps": cfg.steps}},
                 lineage=lineage, config=cfg.model_dump(mode="json"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    del live  # a later load in this process (e.g. of the saved folder) is a plain one again
    return metrics
