"""Stage 3 (instruction tuning) under DeepSpeed ZeRO-3 (`configs/deepspeed/zero3.json`), on CPU (gloo) with the
evaluation tests' tiny models: the stage-2 folder loads partitioned, full and LoRA tuning train, the saved folder
is complete and holds what the engine held, and a killed run resumes to the uninterrupted run's result."""

# ruff: noqa: F811
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fmrilm_core.runtime import LocalRuntime
from llm_train import instruct
from llm_train.config import InstructConfig, LLMAlignConfig
from llm_train.export import load_aligned
from llm_train.instruct import ChatFormat, InstructBatches, InstructInputs, answer_loss
from tests.conftest import StopAfter

# the evaluation tests' 32-subject cohort and the tiny Llama aligned on it: pytest finds fixtures by name, so the
# test functions' `corpus` and `model_dir` arguments are these (ruff reads that as a redefinition: F811)
from tests.test_eval import corpus, model_dir  # noqa: F401

ZERO3 = Path(__file__).parents[1] / "configs" / "deepspeed" / "zero3.json"


def zero3_cfg(**extra) -> InstructConfig:
    data = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "eval_every": 4, "eval_items": 4, "max_tokens": 32,
            "deepspeed": str(ZERO3), "precision": "fp32", "optim": {"lr": 3e-3, "warmup_steps": 1}}
    return InstructConfig.model_validate(data | extra)


def folder_answer_loss(folder: Path, corpus: Path, cfg: InstructConfig, dtype=torch.float32) -> float:
    """The val answer loss stage 3 measures, on `folder` loaded with the stock loader (plain, not partitioned): the
    same val items, in the same batches."""
    model, tokenizer, brain, meta = load_aligned(folder, dtype=dtype)
    assert not any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3's config is no longer alive
    if meta["lora"]:
        model.backbone = model.backbone.merge_and_unload()
    val = InstructBatches(corpus, "val", brain, ChatFormat(tokenizer), cfg.model_copy(update={"batch_size": 4}),
                          meta["input_mode"] == "features", connectivity=model.connectivity)
    picks = list(range(min(cfg.eval_items, len(val.examples))))
    return answer_loss(model, [val.rows(picks[i:i + 4]) for i in range(0, len(picks), 4)], "cpu")


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def spy_on_loading(monkeypatch) -> list[dict]:
    """What `prepare_model` received: the stage-2 backbone's base weights that did not arrive partitioned (ZeRO-3
    marks a partitioned one with `ds_id`, its local data empty), whether it came as a peft model, and whether
    with the live DeepSpeed config."""
    seen: list[dict] = []
    prepare = instruct.prepare_model

    def spy(cfg, model, n_tokens, live=None):
        base = {n: p for n, p in model.backbone.named_parameters() if "lora_" not in n and "trainable_tokens" not in n}
        seen.append({"whole": sorted(n for n, p in base.items() if not hasattr(p, "ds_id") or p.numel() > 0),
                     "peft": hasattr(model.backbone, "peft_config"), "live": live is not None})
        return prepare(cfg, model, n_tokens, live)

    monkeypatch.setattr(instruct, "prepare_model", spy)
    return seen


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory, corpus, model_dir, llm_dir) -> Path:
    """A LoRA stage-2 folder (adapter + trainable brain rows) aligned 1 step on the same corpus and tokenizer."""
    from llm_train.train import AlignInputs
    from llm_train.train import train as train_align

    cfg = LLMAlignConfig.model_validate({
        "base": str(llm_dir), "batch_size": 2, "steps": 1, "checkpoint_every": 1, "eval_every": 1,
        "max_caption_tokens": 16, "t2t_tokens": 16, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "lora": {"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0},
        "eval": {"scans": 2, "caption_scans": 2, "max_new_tokens": 2, "t2t_docs": 2}})
    out = tmp_path_factory.mktemp("instruct_zero3") / "llm_lora"
    train_align(cfg, AlignInputs(corpus, model_dir / "brain_tokenizer", out), LocalRuntime(out / "checkpoints"))
    assert (out / "adapter_config.json").is_file()
    return out


def test_full_tuning_under_zero3_saves_what_the_engine_held_and_a_killed_run_resumes(corpus, model_dir, tmp_path,
                                                                                       monkeypatch):
    seen = spy_on_loading(monkeypatch)
    cfg = zero3_cfg()
    whole = tmp_path / "whole"
    metrics = instruct.train(cfg, InstructInputs(model_dir, corpus, whole), LocalRuntime(whole / "checkpoints"))
    # the DeepSpeed config was alive before the stage-2 folder loaded: from_pretrained partitioned its weights
    assert seen == [{"whole": [], "peft": False, "live": True}]
    meta = json.loads((whole / "brain.json").read_text())
    assert (meta["stage"], meta["prompt_format"], meta["lora"]) == ("instruct", "chat", False)
    # gathered before saving: every tensor whole (partitioned ones would be empty), the shapes of the model
    tensors = saved_tensors(whole)
    config = json.loads((whole / "config.json").read_text())
    assert tensors["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in tensors.values())
    stage2 = saved_tensors(model_dir)
    assert any(not torch.equal(t, stage2[n]) for n, t in tensors.items())  # it trained
    # the saved folder, loaded plainly in this process, gives the engine's final val answer loss
    assert folder_answer_loss(whole, corpus, cfg) == pytest.approx(metrics["val/answer_loss"], rel=1e-5)
    # ... and the untrained one gives the loss measured on the partitioned model before training
    assert folder_answer_loss(model_dir, corpus, cfg) == pytest.approx(metrics["val/answer_loss_before"], rel=1e-5)

    # killed right after the checkpoint of step 2, then run again: it resumes there and ends where `whole` did
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        instruct.train(cfg, InstructInputs(model_dir, corpus, killed), StopAfter(killed / "checkpoints", 2))
    assert not (killed / "config.json").exists()
    logged: list[int] = []
    resumed = instruct.train(cfg, InstructInputs(model_dir, corpus, killed),
                             LocalRuntime(killed / "checkpoints", lambda m, step: logged.append(step)))
    assert logged and min(logged) >= 2  # steps 0 and 1 were not trained again
    assert resumed == pytest.approx(metrics, rel=1e-5)
    again = saved_tensors(killed)
    assert all(torch.allclose(again[n], t, rtol=1e-5, atol=1e-6) for n, t in tensors.items())


def test_lora_tuning_of_a_lora_stage2_folder_under_zero3_bf16_merges_on_gathered_weights(corpus, lora_model_dir,
                                                                                          tmp_path, monkeypatch):
    seen = spy_on_loading(monkeypatch)
    cfg = zero3_cfg(precision="bf16", lora={"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0})
    out = tmp_path / "llm3"
    metrics = instruct.train(cfg, InstructInputs(lora_model_dir, corpus, out), LocalRuntime(out / "checkpoints"))
    # the stage-2 adapter's base loaded partitioned and peft added the adapter on it; only the embedding and head
    # are whole: transformers grows them to the folder's vocabulary outside zero.Init (the engine partitions them)
    resized = ["base_model.model.lm_head.token_adapter.base_layer.weight",
               "base_model.model.model.embed_tokens.token_adapter.base_layer.weight"]
    assert seen == [{"whole": resized, "peft": True, "live": True}]
    # merged twice (the stage-2 adapter on load, the fresh one on save): a plain folder, whole, in the base's dtype
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "brain.json").read_text())["lora"] is False
    tensors = saved_tensors(out)
    assert all(t.numel() > 0 and t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in tensors.values())
    # the load-time merge on gathered weights is the plain merge: the loss before training is the stage-2 model's
    assert folder_answer_loss(lora_model_dir, corpus, cfg, torch.bfloat16) == pytest.approx(
        metrics["val/answer_loss_before"], rel=2e-3)
    # the save-time merge holds the trained adapter and brain rows: the engine's final loss, not the one before
    after = folder_answer_loss(out, corpus, cfg, torch.bfloat16)
    assert after == pytest.approx(metrics["val/answer_loss"], rel=2e-3)
    assert abs(after - metrics["val/answer_loss_before"]) > 20 * abs(after - metrics["val/answer_loss"])


@pytest.mark.slow
def test_zero3_lora_on_two_ray_train_workers_trains_resumes_and_saves_a_whole_folder(corpus, lora_model_dir,
                                                                                     tmp_path):
    """2 Ray Train CPU workers (gloo), each holding half of every partitioned weight; a second fit of the same run
    with more steps resumes from the first one's last checkpoint."""
    import ray

    from cluster.launch import run_training

    cfg = zero3_cfg(precision="bf16", steps=2, checkpoint_every=2, eval_every=2,
                    lora={"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0})
    out, marks = tmp_path / "llm3", tmp_path / "logged"
    marks.mkdir()
    inputs = InstructInputs(lora_model_dir, corpus, out)

    def logging(fit: int):  # defined here, so it travels to the workers by value
        def log(metrics: dict, step: int) -> None:
            (marks / f"{fit}-{step}").touch()
        return log

    try:
        first = run_training(instruct.train, cfg, inputs, workers=2, log_fn=logging(1), storage=tmp_path / "ray",
                             name="instruct_zero3")
        longer = cfg.model_copy(update={"steps": 4, "eval_every": 4})
        second = run_training(instruct.train, longer, inputs, workers=2, log_fn=logging(2),
                              storage=tmp_path / "ray", name="instruct_zero3")
    finally:
        ray.shutdown()
    assert first["step"] == 2 and second["step"] == 4
    logged = {fit: {int(p.name.split("-")[1]) for p in marks.glob(f"{fit}-*")} for fit in (1, 2)}
    assert min(logged[1]) == 0 and min(logged[2]) >= 2  # the second fit started from the step-2 checkpoint
    assert second["val/answer_loss_before"] == pytest.approx(first["val/answer_loss_before"])
    tensors = saved_tensors(out)
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in tensors.values())
    assert folder_answer_loss(out, corpus, longer, torch.bfloat16) == pytest.approx(second["val/answer_loss"],
                                                                                   rel=2e-3)
