"""DeepSpeed ZeRO-3 around a Hugging Face backbone, shared by stage 2 (`train.py`) and stage 3 (`instruct.py`).

Under ZeRO-3 every rank holds a slice of each parameter (`ds_id` marks one; its `.data` is empty outside a gather):
- `live_config(ds_config)` makes the config alive (`HfDeepSpeedConfig`) so `from_pretrained` partitions weights as
  it loads them; it must stay referenced while backbones load, and be dropped afterwards (a later plain load would
  partition too);
- `modify(params)` gathers parameters for writing (rank 0's values are broadcast and re-partitioned);
- `peft_on_partitioned(make, backbone, live)` runs peft on a partitioned backbone (its trainable-token rows are
  gathered by hand, see there);
- `merged(backbone)` merges a peft backbone's adapters into gathered base weights and writes them back.
Off ZeRO-3 (no `ds_id` anywhere, `live` None) each is the plain operation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def live_config(ds_config: dict):
    """The live `HfDeepSpeedConfig` of a ZeRO-3 `ds_config` (None for stages 0-2); keep it referenced until the
    backbone is built and trained. Under ZeRO-3 `ds_config` also asks for a consolidated 16-bit state on save
    (DeepSpeed's own model save; the model folders gather parameters by hand, `fmrilm_core.engine.gathered`)."""
    if zero_stage(ds_config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    ds_config.setdefault("zero_optimization", {}).setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return HfDeepSpeedConfig(ds_config)


def modify(params: list[torch.nn.Parameter]):
    """Write access to (possibly ZeRO-3 partitioned) parameters; rank 0's values are broadcast."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def merged(backbone):
    """A peft backbone with its adapters (LoRA, trainable tokens) merged into the base weights, the plain model;
    any other backbone as it is. Under ZeRO-3 the merge runs on gathered weights and is written back."""
    if not hasattr(backbone, "peft_config"):
        return backbone
    with modify(list(backbone.parameters())):
        return backbone.merge_and_unload()


def peft_on_partitioned(make: Callable[[], torch.nn.Module], backbone, live):
    """`make()`: peft wrapping `backbone` (a fresh `get_peft_model` or a saved `PeftModel.from_pretrained`).

    With `live` (ZeRO-3): peft (0.21) gathers the trainable-token rows of partitioned weights on CUDA only, so the
    embedding (and an untied head) is gathered here and peft runs with the HF DeepSpeed config switched off, reading
    plain tensors (DeepSpeed partitions what peft adds when the engine is built). A trainable-tokens layer reads its
    rows (held in a ParameterDict, a module whose forward never runs) and its base weight inside its own forward;
    ZeRO-3 gathers only a module's own parameters around its forward, so those are registered with it, or they
    would be seen partitioned (empty)."""
    if live is None:
        return make()
    import deepspeed
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    head = backbone.get_output_embeddings()
    embeddings = [backbone.get_input_embeddings().weight] + ([head.weight] if head is not None else [])
    embeddings = list({id(p): p for p in embeddings if hasattr(p, "ds_id")}.values())  # a tied head: one weight
    with deepspeed.zero.GatheredParameters(embeddings, modifier_rank=None):
        unset_hf_deepspeed_config()
        try:
            model = make()
        finally:
            set_hf_deepspeed_config(live)
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            for param in [*module.trainable_tokens_delta.parameters(), module.get_base_layer().weight]:
                deepspeed.zero.register_external_parameter(module, param)
    return model
