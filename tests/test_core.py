"""fmrilm_core, the plumbing every stage shares: it imports no stage; fingerprint and resume, the engine's
config and LR schedule, and the base-LLM loader's one-line errors."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from pydantic import Field

from fmrilm_core.checkpoint import CLIENT_STATE, config_fingerprint, resume_point
from fmrilm_core.config import StrictModel
from fmrilm_core.engine import deepspeed_config, lr_lambda
from fmrilm_core.errors import InputError
from fmrilm_core.llm import resolve_llm
from fmrilm_core.runtime import COMPLETE, LocalRuntime

CORE = Path(__file__).parents[1] / "fmrilm_core"
STAGES = {"corpus_builder", "tokenizer_train", "llm_train", "evaluation", "cluster"}


def test_core_imports_no_stage():
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # top-level and function-local imports alike
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & STAGES, f"{path.name} imports {names}"


class Run(StrictModel):
    lr: float = 1e-3
    steps: int = Field(10, ge=1)
    every: int = 5


def test_fingerprint_ignores_only_the_excluded_keys():
    base = config_fingerprint(Run(), {"steps", "every"})
    assert len(base) == 16 and int(base, 16) >= 0
    assert config_fingerprint(Run(steps=99, every=1), {"steps", "every"}) == base
    assert config_fingerprint(Run(lr=2e-3), {"steps", "every"}) != base
    assert config_fingerprint(Run(steps=99), set()) != config_fingerprint(Run(), set())


def test_resume_point_refuses_a_checkpoint_of_another_config(tmp_path):
    runtime = LocalRuntime(tmp_path / "ckpt")
    assert resume_point(runtime, "a" * 16) is None
    directory = runtime.checkpoint_dir(3)
    (directory / CLIENT_STATE).write_text(json.dumps({"step": 3, "fingerprint": "a" * 16}))
    assert resume_point(runtime, "a" * 16) is None  # not committed yet: an interrupted save is no resume point
    runtime.commit_checkpoint(directory, 3, {})
    assert (directory / COMPLETE).is_file() and resume_point(runtime, "a" * 16) == directory
    with pytest.raises(InputError, match=re.escape(f"{directory}: checkpoint of another config")):
        resume_point(runtime, "b" * 16)


def test_deepspeed_config_and_lr_schedule(tmp_path):
    ds = deepspeed_config(None, micro_batch=4, grad_clip=0.5, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                          precision="fp32", grad_accum=2)
    assert ds["zero_optimization"] == {"stage": 0} and ds["bf16"] == {"enabled": False}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (4, 2, 0.5)
    assert ds["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "torch_adam": True}
    (tmp_path / "z.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64,
                                                 "fp16": {"enabled": True}, "steps_per_print": 7}))
    ds = deepspeed_config(tmp_path / "z.json", micro_batch=4, grad_clip=1.0, lr=1e-3, betas=(0.9, 0.95),
                          weight_decay=0.0, precision="bf16")
    assert ds["zero_optimization"] == {"stage": 2} and "train_batch_size" not in ds and "bf16" not in ds
    assert ds["steps_per_print"] == 7 and deepspeed_config(None, micro_batch=1, grad_clip=1.0, lr=1.0, betas=(0, 0),
                                                           weight_decay=0, precision="bf16")["bf16"]["enabled"]
    constant = lr_lambda(warmup_steps=4, total_steps=10, schedule="constant", min_lr_ratio=0.0)
    assert [constant(s) for s in (0, 3, 4, 100)] == [0.25, 1.0, 1.0, 1.0]
    cosine = lr_lambda(warmup_steps=0, total_steps=10, schedule="cosine", min_lr_ratio=0.2)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.6) and cosine(10) == cosine(50) == pytest.approx(0.2)


def test_resolve_llm_folders_gguf_files_and_one_line_errors(tiny_llm_dir, tmp_path):
    assert resolve_llm(tiny_llm_dir, None) == (tiny_llm_dir, None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_llm(str(tmp_path / "m.gguf"), None) == (tmp_path, "m.gguf")
    assert resolve_llm(tmp_path, "m.gguf") == (tmp_path, "m.gguf")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nowhere'}: LLM folder not found")):
        resolve_llm(tmp_path / "nowhere", None)
    with pytest.raises(InputError, match="no GGUF file other.gguf"):
        resolve_llm(tmp_path, "other.gguf")
    with pytest.raises(InputError, match="no config.json"):
        resolve_llm(tmp_path, None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: the LLM folder has no weights")):
        resolve_llm(tmp_path, None)
