"""Stage 2's wiring carries the scan to the caption: what is placed in the brain codes or the connectivity tokens can be
learned into the caption by a tiny model, and the caption loss reaches the brain and connectivity rows.

The machinery is stage 2's own: `add_brain_tokens` / `ConnectivityTokens.add_to` and their row initialisation,
`AlignModel`'s scan layout, positions, F2T labels and loss, `CaptionSuffix`, and validation's `generate`. Only the
backbone (a 2-layer Llama, hidden 32, random weights), the word-level tokenizer of the tests and the toy data are
small. `bench/stage2_learnability.py` is the same check on the bench corpus with a bigger model.
"""

from __future__ import annotations

import pytest
import torch

from llm_train.connectivity import ConnectivityTokens
from llm_train.data import CaptionSuffix
from llm_train.evaluate import caption_loss_given_scan, generate
from llm_train.model import AlignModel
from llm_train.vocabulary import add_brain_tokens, init_brain_rows
from tests.conftest import tiny_tokenizer

K, W, N = 8, 2, 4               # codebook size, steps, ROIs: 8 brain tokens a scan
# (step, ROI) whose code the first caption word says. The first of the block: measured with this model (lr 1e-2,
# batch 32), the code at (0, 0) is learned by step 200 (100 % of held-out scans), where a code inside the block,
# (1, 2), found by its position alone among 8 alike brain tokens, stayed at chance (50 %) through 300 steps, and the
# connectivity token (its id names its network pair) is learned by step 50.
CODE_AT = (0, 0)
PAIR = 2                        # the connectivity token (network pair) whose level the second word says
PROMPT = "the brain"


def toy_model(seed: int = 0):
    """(AlignModel on a 2-layer random Llama with K brain tokens and 3 two-level connectivity tokens, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    n_text = len(tokenizer)
    vocab = add_brain_tokens(tokenizer, K)
    connectivity = ConnectivityTokens(networks=["A", "B"], membership=[0, 0, 1, 1], pairs=[(0, 0), (1, 1), (0, 1)],
                                      edges=[[0.0], [0.0], [0.0]]).add_to(tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    backbone = LlamaForCausalLM(config)
    with torch.no_grad():
        init_brain_rows(backbone, vocab, n_text, torch.randn(K, 32))
        connectivity.init_rows(backbone, tokenizer)
    model = AlignModel(backbone, vocab, n_steps=W, n_rois=N, codebook_size=K,
                       weights={"f2f": 0.0, "f2t": 1.0, "t2t": 0.0}, connectivity=connectivity)
    return model, tokenizer


def toy_batch(model: AlignModel, size: int, generator: torch.Generator) -> tuple[dict, list[str]]:
    """Random scans (codes and connectivity levels) and captions "the <code word> <level word>": the first word says
    whether the code at CODE_AT is below K / 2, the second the level of connectivity pair PAIR."""
    c = model.connectivity
    codes = torch.randint(0, K, (size, W, N), generator=generator)
    levels = torch.randint(0, c.bins, (size, c.n_tokens), generator=generator)
    ids = c.first_id + torch.arange(c.n_tokens) * c.bins + levels
    captions = [f"the {'strongly' if codes[i, CODE_AT[0], CODE_AT[1]] < K // 2 else 'weak'} "
                f"{'visual' if levels[i, PAIR] == 1 else 'salience'}" for i in range(size)]
    return {"codes": codes, "connectivity": ids}, captions


def test_what_the_scan_tokens_say_reaches_the_caption():
    model, tokenizer = toy_model()
    suffix = CaptionSuffix(tokenizer, PROMPT, max_caption_tokens=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(250):
        scans, captions = toy_batch(model, 32, data)
        loss = model(scans | suffix(captions))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    scans, captions = toy_batch(model, 128, torch.Generator().manual_seed(2))  # scans never trained on
    said = [tokenizer.decode(ids, skip_special_tokens=True).split()
            for ids in generate(model, scans, suffix.prompt_ids, 4, tokenizer.eos_token_id)]
    truth = [c.split() for c in captions]
    code_word = sum(s[1:2] == t[1:2] for s, t in zip(said, truth)) / len(truth)
    level_word = sum(s[2:3] == t[2:3] for s, t in zip(said, truth)) / len(truth)
    # a caption that ignores the scan is right half the time on each word
    assert code_word >= 0.9, f"the brain code's word right on {code_word:.0%} of held-out scans"
    assert level_word >= 0.9, f"the connectivity level's word right on {level_word:.0%} of held-out scans"

    # validation's teacher-forced yardstick sees it too: each held-out caption costs less given its own scan than
    # given the shuffled control's scan, with an interval that excludes 0
    one = [{k: v[i:i + 1] for k, v in scans.items()} for i in range(32)]
    saved = caption_loss_given_scan(model.f2t_loss, one, [suffix([c]) for c in captions[:32]], list(range(32)))
    assert saved["caption_loss_saved_by_scan"] > 0.1 and saved["caption_loss_saved_by_scan_ci_low"] > 0, saved
    assert saved["caption_loss_shuffled_scan"] - saved["caption_loss_own_scan"] == \
        pytest.approx(saved["caption_loss_saved_by_scan"])


def test_caption_loss_has_a_gradient_on_the_brain_and_connectivity_rows():
    model, tokenizer = toy_model()
    suffix = CaptionSuffix(tokenizer, PROMPT, max_caption_tokens=8)
    scans, captions = toy_batch(model, 4, torch.Generator().manual_seed(3))
    model(scans | suffix(captions))["f2t"].backward()
    grad = model.backbone.get_input_embeddings().weight.grad
    brain_rows = model.vocab.ids(scans["codes"]).unique()
    fc_rows = scans["connectivity"].unique()
    assert (grad[brain_rows].abs().sum(1) > 0).all(), "a brain token of the batch gets no gradient from the caption"
    assert (grad[fc_rows].abs().sum(1) > 0).all(), "a connectivity token of the batch gets no gradient"
    assert grad[model.vocab.scan_start].abs().sum() > 0 and grad[model.vocab.scan_end].abs().sum() > 0
