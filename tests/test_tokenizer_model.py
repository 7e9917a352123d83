"""The brain tokenizer model: shapes, the time-major token order, the quantiser's EMA codebook, export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenizer_train import BrainTokenizer
from tokenizer_train.config import TokenizerModelConfig
from tokenizer_train.model import token_index, token_position
from tokenizer_train.quantizer import VectorQuantizer

B, T, N, P = 3, 30, 12, 8  # T not a multiple of P: the last patch is zero-padded
W = math.ceil(T / P)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: two threads only spin against each other (and against other jobs on a shared box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> TokenizerModelConfig:
    values = dict(n_rois=N, length=T, patch=P, dim=32, depth=1, heads=2, codebook_size=64, code_dim=16,
                  llm_dim=24, decoder_depth=1)
    return TokenizerModelConfig(**(values | overrides))


@pytest.fixture
def model() -> BrainTokenizer:
    torch.manual_seed(0)
    return BrainTokenizer(tiny_config())


def batch(seed: int = 0, b: int = B) -> torch.Tensor:
    return torch.randn(b, T, N, generator=torch.Generator().manual_seed(seed))


def test_output_shapes(model):
    out = model(batch())
    c = model.config
    assert out.codes.shape == (B, W, N) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < c.codebook_size
    assert out.quantized.shape == out.pre_quant.shape == (B, W, N, c.code_dim)
    assert out.llm_tokens.shape == out.llm_latents.shape == (B, W, N, c.llm_dim)
    assert out.pooled.shape == (B, c.llm_dim)
    assert out.recon.shape == (B, T, N)
    assert out.commit_loss.ndim == 0 and 0 <= out.commit_loss.item() <= 4
    assert set(out.vq_stats) == {"usage", "perplexity"}
    torch.testing.assert_close(out.pre_quant.norm(dim=-1), torch.ones(B, W, N))
    torch.testing.assert_close(out.llm_tokens, model.to_llm(out.quantized))
    torch.testing.assert_close(out.pooled, out.llm_tokens.mean(dim=(1, 2)))
    model.eval()  # no EMA step after the lookup: the vectors are the codebook's rows
    out = model(batch())
    torch.testing.assert_close(out.quantized, model.quantizer.lookup(out.codes))
    assert model.codebook.shape == (c.codebook_size, c.llm_dim)
    assert model.quantizer.codebook.shape == (c.codebook_size, c.code_dim)


def test_domain_view_of_text_is_the_orthogonal_projection_onto_the_reachable_subspace(model):
    """code_dim 16 < llm_dim 24: codes reach only {W c + b}; the classifier sees text where codes can be."""
    text = 3 * torch.randn(40, model.config.llm_dim, generator=torch.Generator().manual_seed(1))
    out = model(batch(), text)
    view, weight, bias = out.text_view, model.to_llm.weight.detach(), model.to_llm.bias.detach()
    coef = torch.linalg.lstsq(weight, (view - bias).T).solution
    torch.testing.assert_close((weight @ coef).T + bias, view, atol=1e-4, rtol=1e-4)  # inside the subspace
    torch.testing.assert_close(weight.T @ (text - view).T, torch.zeros(weight.shape[1], len(text)),
                               atol=1e-4, rtol=0)  # what is dropped is orthogonal to it
    torch.testing.assert_close(model.to_llm.text_view(view), view, atol=1e-4, rtol=1e-4)  # a projection
    torch.testing.assert_close(out.llm_latents, model.to_llm(model.quantizer_inputs(batch())))
    assert not torch.allclose(view, text)

    wide = BrainTokenizer(tiny_config(code_dim=24))  # the codes' space covers the LLM's: text as it is
    assert torch.equal(wide(batch(), text).text_view, text)


def test_bad_input_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match="expected X"):
        model(torch.randn(2, T, N + 1))
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(torch.zeros(W + 1, N, dtype=torch.long))


def test_token_index_is_time_major():
    assert [token_index(w, n, 3) for w in range(2) for n in range(3)] == list(range(6))
    assert all(token_position(token_index(w, n, N), N) == (w, n) for w in range(W) for n in range(N))


@pytest.mark.parametrize(("w", "n"), [(0, 0), (1, 5), (W - 1, N - 1)])
def test_perturbing_one_step_of_one_roi_changes_exactly_token_w_n(model, w, n):
    x = batch()
    x2 = x.clone()
    x2[:, w * P:(w + 1) * P, n] += 1.0  # for the last, padded step only its real volumes exist
    changed = (model.embed_tokens(x2) - model.embed_tokens(x)).abs().sum(-1) > 0  # [B, W*N]
    assert changed.shape == (B, W * N)
    assert changed.sum(1).tolist() == [1] * B
    assert changed[:, token_index(w, n, N)].all()


def test_codes_and_patches_follow_the_token_order(model):
    x = batch()
    patches = model.patchify(x)  # [B, W, N, P]
    assert patches.shape == (B, W, N, P)
    for w, n in [(0, 3), (2, 7), (W - 1, 0)]:
        volumes = x[:, w * P:min((w + 1) * P, T), n]
        torch.testing.assert_close(patches[:, w, n, :volumes.shape[1]], volumes)
    assert (patches[:, W - 1, :, T - (W - 1) * P:] == 0).all()  # zero padding of the last step
    torch.testing.assert_close(model.unpatchify(patches), x)
    # The encoder output and the codes use the same flattening: sequence index w * N + n.
    model.eval()
    out = model(x)
    seq = model.encoder_norm(model.encoder[0](model.embed_tokens(x)))
    z = F.normalize(model.to_code(seq), dim=-1)
    for w, n in [(0, 3), (2, 7), (W - 1, N - 1)]:
        torch.testing.assert_close(z[:, token_index(w, n, N)], out.pre_quant[:, w, n])
        assert (out.codes.reshape(B, W * N)[:, token_index(w, n, N)] == out.codes[:, w, n]).all()


def test_straight_through_gradients_reach_the_encoder(model):
    out = model(batch())
    out.quantized.square().sum().backward()  # no commitment loss: only the STE path
    for p in (model.patch_embed.weight, model.encoder[0].attn.qkv.weight, model.to_code.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.to_llm.weight.grad is None


def test_codebook_moves_by_ema_in_train_mode_only(model):
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("quantizer.") for name in names)
    buffers = {name for name, _ in model.named_buffers()}
    assert {"quantizer.embed", "quantizer.cluster_size", "quantizer.embed_sum"} <= buffers

    model.train()
    model(batch(0))  # k-means init on this first batch
    before = model.quantizer.embed.clone()
    model(batch(1))
    assert not torch.equal(model.quantizer.embed, before)

    model.eval()
    before = model.quantizer.embed.clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = model(batch(2))
    (F.mse_loss(out.recon, batch(2)) + out.commit_loss + out.pooled.sum()).backward()
    opt.step()
    assert torch.equal(model.quantizer.embed, before)
    model.encode(batch(3))
    assert torch.equal(model.quantizer.embed, before)


def test_codebook_state_stays_float32_in_a_bf16_model():
    torch.manual_seed(0)
    model = BrainTokenizer(tiny_config()).to(torch.bfloat16).train()
    assert model.patch_embed.weight.dtype == torch.bfloat16
    assert {model.quantizer.embed.dtype, model.quantizer.embed_sum.dtype, model.quantizer.cluster_size.dtype} \
        == {torch.float32}
    out = model(batch().bfloat16())
    assert out.recon.dtype == out.llm_tokens.dtype == torch.bfloat16
    (out.recon.float().square().mean() + out.commit_loss).backward()
    assert model.encode(batch()[0]).shape == (W, N) and model.codebook.shape == (64, 24)


def test_kmeans_init_runs_once_on_the_first_training_batch(monkeypatch):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, kmeans_iters=5, dead_code_threshold=0)
    calls = []
    original = vq._kmeans_init
    monkeypatch.setattr(vq, "_kmeans_init", lambda z: (calls.append(len(z)), original(z)))
    centres = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=-1)
    z = centres.repeat_interleave(50, 0) + 0.05 * torch.randn(100, 4)

    vq.eval()
    vq(z)
    assert calls == [] and not bool(vq.initialized)
    vq.train()
    vq(z)
    assert calls == [100] and bool(vq.initialized)
    # Every code is one of the two clusters' centres, found by k-means on that batch.
    assert (vq.codebook @ centres.t()).max(1).values.min() > 0.95
    vq(z)
    assert calls == [100]


def test_kmeans_init_samples_with_replacement_from_a_small_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 4, kmeans_iters=2, dead_code_threshold=0).train()
    z = F.normalize(torch.randn(10, 4), dim=-1)
    vq(z)
    # Each code is one of the 10 latents (possibly repeated).
    assert (vq.codebook @ z.t()).max(1).values.min() > 1 - 1e-5


def test_dead_codes_restart_from_the_current_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, ema_decay=0.9, kmeans_init=False, dead_code_threshold=0.5).train()
    z = F.normalize(torch.cat([torch.randn(64, 4).abs(), torch.zeros(64, 4)], 1), dim=-1)  # positive orthant
    vq(z)  # every code unused so far (EMA counts start at 0) -> all live codes come from this batch
    vq(z)
    # Kill four codes: point them orthogonally to all data (live codes, from the data, are closer) and zero
    # their usage.
    dead = torch.arange(4)
    vq.embed[dead] = torch.eye(8)[7]
    vq.embed_sum[dead] = vq.embed[dead]
    vq.cluster_size[dead] = 0.0
    vq.eval()
    assert not torch.isin(dead, vq(z)[1]).any()
    vq.train()
    vq(z)
    # Revived: each is now one of the batch's latents, with a fresh EMA count above the threshold ...
    assert ((vq.codebook[dead] @ z.t()).max(1).values > 1 - 1e-5).all()
    assert (vq.cluster_size[dead] >= vq.dead_code_threshold).all()
    # ... and the latent it copied now picks it (or an identical twin).
    vq.eval()
    codes = vq(z)[1]
    assert torch.isin(dead, codes).any()


def _distributed_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different initial codebooks, data and restart draws on each rank
    vq = VectorQuantizer(16, 4, kmeans_iters=3, dead_code_threshold=3.0).train()  # restarts on most steps
    for _ in range(4):
        vq(torch.randn(20, 4) + rank)
    gathered = [torch.zeros_like(vq.embed) for _ in range(world)]
    dist.all_gather(gathered, vq.embed)
    if rank == 0:
        torch.save(torch.stack(gathered), result_file)
    dist.destroy_process_group()


def test_every_rank_keeps_the_same_codebook(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "codebooks.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    codebooks = torch.load(result, weights_only=True)
    assert torch.equal(codebooks[0], codebooks[1])


def test_usage_and_perplexity_of_a_constructed_batch():
    vq = VectorQuantizer(8, 8, kmeans_init=False).eval()
    vq.embed.copy_(torch.eye(8))
    z = torch.eye(8)[[0, 0, 1, 2]] * 3.0  # normalised inside: codes 0, 0, 1, 2
    q, codes, commit, stats = vq(z)
    assert codes.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(q, torch.eye(8)[[0, 0, 1, 2]])
    assert float(commit) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["usage"]) == pytest.approx(3 / 8)
    assert float(stats["perplexity"]) == pytest.approx(2 ** 1.5)  # entropy of (1/2, 1/4, 1/4) = 1.5 bits

    q, codes, commit, _ = vq(torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0]]))  # 45 degrees from codes 0 and 1
    assert float(commit) == pytest.approx(2 - 2 * math.cos(math.pi / 4), abs=1e-5)


def test_encode_decode_round_trip_shapes_and_determinism(model):
    model.train()
    model(batch(0))  # k-means init, so codes spread over the codebook
    x = batch(5)
    codes = model.encode(x[0])
    assert codes.shape == (W, N) and codes.dtype == torch.long
    assert model.training  # encode restores the mode
    assert torch.equal(model.encode(x[0]), codes)
    assert torch.equal(model.encode(x)[0], codes)
    assert torch.equal(model.encode(x[0].numpy()), codes)
    assert model.decode(codes).shape == (T, N)
    assert model.decode(model.encode(x)).shape == (B, T, N)
    model.eval()
    torch.testing.assert_close(model.decode(codes), model(x[:1]).recon[0])


def test_reconstruction_loss_decreases():
    torch.manual_seed(0)
    model = BrainTokenizer(tiny_config(codebook_size=32)).train()
    t = torch.arange(T, dtype=torch.float32)[None, :, None]
    freq = torch.linspace(0.1, 0.5, N)[None, None, :]
    x = torch.sin(freq * t + torch.rand(8, 1, N) * 6.28)  # smooth, structured signals
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        out = model(x)
        loss = F.mse_loss(out.recon, x)
        losses.append(loss.item())
        opt.zero_grad()
        (loss + 0.25 * out.commit_loss).backward()
        opt.step()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_roi_gradients_embedding(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(roi_embedding="gradients")
    gradients = np.random.default_rng(0).normal(size=(N, 3))
    model = BrainTokenizer(config)
    with pytest.raises(RuntimeError, match="set_roi_gradients"):
        model(batch())
    with pytest.raises(ValueError, match="n_rois"):
        model.set_roi_gradients(gradients[:5])
    model.set_roi_gradients(gradients)
    assert "roi_gradients" in dict(model.named_buffers()) and "pos.roi" not in dict(model.named_parameters())
    assert model.roi_proj.weight.shape == (config.dim, 3)
    out = model(batch())
    assert out.codes.shape == (B, W, N)
    same = BrainTokenizer(config, roi_gradients=gradients)
    torch.testing.assert_close(same.roi_gradients, model.roi_gradients)

    model.save_pretrained(tmp_path / "tok")
    loaded = BrainTokenizer.from_pretrained(tmp_path / "tok")
    torch.testing.assert_close(loaded.roi_gradients, model.roi_gradients)
    assert torch.equal(loaded.encode(batch(1)), model.encode(batch(1)))


def _trained(model: BrainTokenizer) -> BrainTokenizer:
    model.train()
    for seed in range(3):
        model(batch(seed))
    return model


def test_save_then_load_in_a_fresh_process_gives_the_same_codes(model, tmp_path):
    model = _trained(model)
    out_dir = model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["config"] == model.config.model_dump(mode="json")

    x = batch(7)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np\n"
        "from tokenizer_train import BrainTokenizer\n"
        f"m = BrainTokenizer.from_pretrained({str(out_dir)!r})\n"
        f"np.save({str(tmp_path / 'codes.npy')!r}, m.encode(np.load({str(tmp_path / 'x.npy')!r})).numpy())\n"
        f"np.save({str(tmp_path / 'codebook.npy')!r}, m.codebook.numpy())\n"
        "heavy = [m for m in ('deepspeed', 'ray', 'mlflow', 'cluster', 'llm_train', 'transformers') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, timeout=120)
    assert np.array_equal(np.load(tmp_path / "codes.npy"), model.encode(x).numpy())
    np.testing.assert_allclose(np.load(tmp_path / "codebook.npy"), model.codebook.numpy(), rtol=1e-6)

    loaded = BrainTokenizer.from_pretrained(out_dir)
    assert not loaded.training
    for name, t in model.state_dict().items():  # the EMA state too: training can go on from the export
        assert torch.equal(loaded.state_dict()[name], t), name


def test_loading_errors_are_clear(model, tmp_path):
    out_dir = model.save_pretrained(tmp_path / "tok")
    config_path = out_dir / "config.json"
    meta = json.loads(config_path.read_text())

    with pytest.raises(FileNotFoundError, match="not a directory"):
        BrainTokenizer.from_pretrained(tmp_path / "nowhere")

    config_path.write_text(json.dumps(meta | {"config": meta["config"] | {"dim": 64}}))
    with pytest.raises(ValueError, match="does not match"):
        BrainTokenizer.from_pretrained(out_dir)

    config_path.write_text(json.dumps(meta | {"config": meta["config"] | {"n_layers": 3}}))
    with pytest.raises(ValueError, match="invalid tokenizer config"):
        BrainTokenizer.from_pretrained(out_dir)

    config_path.write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        BrainTokenizer.from_pretrained(out_dir)

    config_path.unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        BrainTokenizer.from_pretrained(out_dir)

    config_path.write_text(json.dumps(meta))
    (out_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        BrainTokenizer.from_pretrained(out_dir)
