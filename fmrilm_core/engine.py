"""DeepSpeed plumbing every training stage shares: the process group, the engine's JSON config, the LR schedule,
the engine over a module's parameter groups, and all parameters gathered on every rank.

Stage-independent: a stage passes its own numbers (micro batch, optimiser settings, precision, the DeepSpeed
JSON of `configs/deepspeed/`) and its own parameter groups; nothing here knows a stage's config type.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import deepspeed
import torch
from torch import nn


def init_distributed() -> None:
    """A process group for DeepSpeed: gloo on CPU, nccl on GPU; a 1-process group when nobody set one up
    (torchrun and Ray Train set one up before the stage runs; DeepSpeed then wraps it)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # a port free now: a fixed or pid-derived one collides on a shared machine
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def from_rank0(fn):
    """`fn()` run on rank 0 only and its (picklable) result handed to every rank: start-up work such as reading the
    corpus once instead of once per rank. Plain `fn()` outside a process group of more than one rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return fn()
    box = [fn() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def deepspeed_config(ds_file: Path | None, *, micro_batch: int, grad_clip: float, lr: float, betas: Sequence[float],
                     weight_decay: float, precision: str, grad_accum: int = 1) -> dict:
    """The engine's config: the DeepSpeed JSON `ds_file` (None = ZeRO-0) with the run's batch, clipping and AdamW
    settings written over it. bf16 follows `precision` ("bf16", "fp32", or "auto" = bf16 on CUDA) unless the
    JSON sets a precision (bf16 / fp16) itself."""
    ds = json.loads(Path(ds_file).read_text()) if ds_file else {"zero_optimization": {"stage": 0}}
    ds.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "weight_decay": weight_decay,
            # torch's AdamW on every device: DeepSpeed's FusedAdam and CPU Adam are extensions built at run time
            # (nvcc or a C++ toolchain on every node)
            "torch_adam": True}},
        "steps_per_print": ds.get("steps_per_print", 10**9),
    })
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from micro batch x accumulation x world size
    if "bf16" not in ds and "fp16" not in ds:  # a DeepSpeed JSON that sets the precision itself wins
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_available())
        ds["bf16"] = {"enabled": bf16}
    return ds


def lr_lambda(*, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> Callable[[int], float]:
    """The LR factor of a step: linear warmup over `warmup_steps`, then constant (`schedule` "constant") or a
    cosine decay to `min_lr_ratio` at `total_steps` ("cosine")."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_engine(module: nn.Module, param_groups: list[dict] | Sequence[nn.Parameter], ds_config: dict,
                 lr_fn: Callable[[int], float]):
    """(DeepSpeed engine, its optimizer) over `param_groups` of `module`, the LR of every group scaled by
    `lr_fn(step)`; sets up the process group first."""
    init_distributed()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
    return engine, optimizer


def gathered(module: nn.Module):
    """Context manager: all parameters of `module` materialised on every rank (ZeRO-3 partitions them), read-only
    (no rank's changes are written back)."""
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
