"""Stage 1 training on a real DeepSpeed engine (CPU, gloo): wiring, resume, bad input, export."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus_builder.build import build_corpus
from corpus_builder.config import SynthConfig
from corpus_builder.readers import roi_network_groups
from corpus_builder.synth import synthesize
from fmrilm.config import load_config
from fmrilm_core.errors import InputError
from fmrilm_core.runtime import LocalRuntime
from tests.conftest import StopAfter
from tokenizer_train.config import TokenizerTrainConfig
from tokenizer_train.engine import Stage1, build_engine
from tokenizer_train.train import TokenizerInputs, train

T = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("stage1")
    synthesize(SynthConfig(subjects=14, length_scale=0.3, datasets=["UKB", "ABCD"]), root / "src")
    cfg = load_config(None, [f"corpus.source.cleaning.length={T}", "corpus.build.shard_size=8",
                             "corpus.build.workers=2", "corpus.splits.fractions=[0.7,0.3,0.0]"])
    build_corpus([str(root / "src")], cfg.corpus, root / "corpus")
    ray.shutdown()
    return root / "corpus"


def tiny_cfg(llm_dir: Path, **extra) -> TokenizerTrainConfig:
    data = {"model": {"length": T, "patch": 8, "dim": 16, "depth": 1, "heads": 2, "codebook_size": 32,
                      "code_dim": 8, "llm_dim": 16, "decoder_depth": 1},
            "text": {"llm": str(llm_dir), "text_batch": 64},
            "optim": {"warmup_steps": 2}, "batch_size": 4, "steps": 6, "checkpoint_every": 3, "eval_every": 6}
    for key, value in extra.items():
        data[key] = value
    return TokenizerTrainConfig.model_validate(data)


def test_every_trainable_parameter_is_in_the_optimizer(tiny_llm_dir):
    cfg = tiny_cfg(tiny_llm_dir)
    module = Stage1(cfg, caption_dim=384)
    engine, optimizer = build_engine(module, cfg)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert {n for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_optimizer} == set()
    # the heads the reference implementation forgot are among them
    assert any(n.startswith("caption_proj.") for n in trainable) and any(n.startswith("domain.") for n in trainable)
    assert any(n.startswith("scan_proj.") for n in trainable)
    assert {"siglip.logit_scale", "siglip.logit_bias"} <= trainable
    assert not any("codebook" in n or n.endswith(".embed") for n in trainable)  # EMA codebook: buffers only


def test_domain_classifier_learns_at_its_own_rate_through_the_schedule(tiny_llm_dir):
    cfg = tiny_cfg(tiny_llm_dir, optim={"lr": 1e-3, "warmup_steps": 2, "domain_lr_scale": 4.0})
    module = Stage1(cfg, caption_dim=384)
    engine, optimizer = build_engine(module, cfg)
    domain = {id(p) for p in module.domain.parameters()}
    for _ in range(3):  # through warmup into the cosine decay
        rates = {}
        for group in optimizer.param_groups:
            kinds = {id(p) in domain for p in group["params"]}
            assert len(kinds) == 1, "a parameter group mixes the classifier with the rest"
            rates[kinds.pop()] = group["lr"]
        assert rates[True] == pytest.approx(4.0 * rates[False]) and rates[False] > 0
        engine.lr_scheduler.step()


def test_cosine_schedule_decays_to_its_floor():
    from tokenizer_train.engine import lr_lambda

    base = {"steps": 12, "optim": {"warmup_steps": 2}}
    plain = lr_lambda(TokenizerTrainConfig.model_validate(base))
    floored = lr_lambda(TokenizerTrainConfig.model_validate(base | {"optim": {"warmup_steps": 2, "min_lr_ratio": 0.1}}))
    assert plain(0) == floored(0) == 0.5 and plain(2) == floored(2) == 1.0  # warmup and peak untouched
    assert plain(12) == pytest.approx(0.0) and floored(12) == pytest.approx(0.1)
    assert floored(7) == pytest.approx(0.1 + 0.9 * plain(7))


def test_stage1_in_bf16_takes_fp32_inputs_and_keeps_losses_and_codebook_fp32(tiny_llm_dir):
    # DeepSpeed's bf16 mode (on GPU) casts the module to bf16 while the reader and text side hand in fp32
    torch.manual_seed(0)
    cfg = tiny_cfg(tiny_llm_dir)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_rois": 20})})
    module = Stage1(cfg, caption_dim=384, caption_center=torch.zeros(384)).to(torch.bfloat16)
    x = torch.randn(4, T, 20)
    losses = module(x, torch.randn(4, 384), torch.randn(64, cfg.model.llm_dim), 0.5, torch.Generator().manual_seed(0))
    for name in ("reconstruction", "commitment", "domain", "siglip", "loss"):
        assert losses[name].dtype == torch.float32 and torch.isfinite(losses[name]), name
    losses["loss"].backward()
    assert module.tokenizer.patch_embed.weight.grad.dtype == torch.bfloat16
    assert module.tokenizer.patch_embed.weight.grad.abs().sum() > 0
    assert module.tokenizer.quantizer.codebook.dtype == torch.float32
    assert module.tokenizer.encode(x[0].numpy()).shape == (T // cfg.model.patch, 20)


def test_moment_term_enters_the_loss_only_when_weighted(tiny_llm_dir):
    x, cap = torch.randn(4, T, 20), torch.randn(4, 384)
    totals = {}
    for weight in (0.0, 2.0):
        cfg = tiny_cfg(tiny_llm_dir, loss={"moments": weight, "domain": 0.0, "contrastive": 0.0})
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_rois": 20})})
        torch.manual_seed(0)
        module = Stage1(cfg, caption_dim=384)
        losses = module(x, cap, torch.randn(64, cfg.model.llm_dim), 0.5, torch.Generator().manual_seed(0))
        totals[weight] = losses
    assert "moments" not in totals[0.0] and float(totals[2.0]["moments"]) > 0
    rest = totals[2.0]["reconstruction"] + 0.25 * totals[2.0]["commitment"]
    torch.testing.assert_close(totals[2.0]["loss"], rest + 2.0 * 0.5 * totals[2.0]["moments"])  # x lambda


def test_scan_embedding_groups_start_from_the_corpus_networks(corpus, tiny_llm_dir):
    import pandas as pd

    groups = roi_network_groups(corpus)
    networks = pd.read_csv(corpus / "rois.tsv", sep="\t")["network"]
    assert groups.shape == (len(networks), networks.nunique()) and (groups.sum(1) == 1).all()
    module = Stage1(tiny_cfg(tiny_llm_dir), caption_dim=384, roi_groups=groups)
    first = networks == sorted(networks.unique())[0]
    assign = module.scan_proj.assign.detach()
    torch.testing.assert_close(assign[first.to_numpy(), 0], torch.full((int(first.sum()),), 1 / first.sum()))
    assert roi_network_groups(corpus / "nowhere") is None


def test_resume_reaches_the_same_final_loss(corpus, tiny_llm_dir, tmp_path):
    cfg = tiny_cfg(tiny_llm_dir)
    straight = train(cfg, TokenizerInputs(corpus, tmp_path / "a"), LocalRuntime(tmp_path / "a" / "ckpt"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, TokenizerInputs(corpus, tmp_path / "b"), StopAfter(tmp_path / "b" / "ckpt", 3))
    runtime = LocalRuntime(tmp_path / "b" / "ckpt")
    assert runtime.latest_checkpoint().name == "step_00000003"
    resumed = train(cfg, TokenizerInputs(corpus, tmp_path / "b"), runtime)
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], abs=1e-5)
    assert resumed["val/reconstruction_r2"] == pytest.approx(straight["val/reconstruction_r2"], abs=1e-5)


def test_bf16_training_validates_checkpoints_and_exports(corpus, tiny_llm_dir, tmp_path):
    # the GPU path (DeepSpeed bf16), run on the CPU: fp32 scans into bf16 weights, fp32 metrics and export
    from tokenizer_train import BrainTokenizer

    cfg = tiny_cfg(tiny_llm_dir, precision="bf16", steps=3, deepspeed="configs/deepspeed/zero2.json")
    metrics = train(cfg, TokenizerInputs(corpus, tmp_path / "out"), LocalRuntime(tmp_path / "ckpt"))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0 <= metrics["val/domain_probe_accuracy"] <= 1 and 0 <= metrics["val/domain_mlp_probe_accuracy"] <= 1
    assert metrics["val/reconstruction_r2"] < 1
    states = next((tmp_path / "ckpt" / "step_00000003" / "engine").glob("*model_states.pt"))
    trained = torch.load(states, weights_only=True)["module"]
    assert trained["tokenizer.patch_embed.weight"].dtype == torch.bfloat16  # the engine really ran in bf16
    tokenizer = BrainTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert tokenizer.patch_embed.weight.dtype == torch.float32  # exported in fp32
    codes = tokenizer.encode(torch.randn(T, 450))
    assert codes.shape == (T // cfg.model.patch, 450) and int(codes.max()) < cfg.model.codebook_size


def test_bad_input_fails_before_any_step(corpus, tiny_llm_dir, tmp_path):
    with pytest.raises(InputError, match=r"T=32 x N=450.*T=40"):
        train(tiny_cfg(tiny_llm_dir, model={**tiny_cfg(tiny_llm_dir).model.model_dump(), "length": 40}),
              TokenizerInputs(corpus, tmp_path / "o"), LocalRuntime(tmp_path / "c"))
    with pytest.raises(InputError, match="test split has no usable scan"):
        from tokenizer_train.data import ScanBatches
        ScanBatches(corpus, "test", 4, length=T, n_rois=450)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train(tiny_cfg(tiny_llm_dir, text={"llm": str(tiny_llm_dir), "text_corpus": str(tmp_path / "nope.txt")}),
              TokenizerInputs(corpus, tmp_path / "o"), LocalRuntime(tmp_path / "c"))
    # one scan per batch has nothing to contrast with: refused when the config is read, fine without SigLIP
    with pytest.raises(ValueError, match="SigLIP loss needs batch_size >= 2"):
        tiny_cfg(tiny_llm_dir, batch_size=1)
    assert tiny_cfg(tiny_llm_dir, batch_size=1, loss={"contrastive": 0.0}).batch_size == 1
    # a checkpoint of another config is refused
    cfg = tiny_cfg(tiny_llm_dir, steps=3)
    train(cfg, TokenizerInputs(corpus, tmp_path / "o"), LocalRuntime(tmp_path / "c"))
    other = tiny_cfg(tiny_llm_dir, steps=3, loss={"domain": 0.0})
    with pytest.raises(InputError, match="checkpoint of another config"):
        train(other, TokenizerInputs(corpus, tmp_path / "o2"), LocalRuntime(tmp_path / "c"))


def test_export_loads_in_a_fresh_process_and_encodes_a_scan(corpus, tiny_llm_dir, tmp_path):
    model = {**tiny_cfg(tiny_llm_dir).model.model_dump(), "roi_embedding": "gradients"}  # fixed from the corpus
    train(tiny_cfg(tiny_llm_dir, steps=2, model=model), TokenizerInputs(corpus, tmp_path / "out"),
          LocalRuntime(tmp_path / "ckpt"))
    code = (
        "import sys, numpy as np\n"
        "from tokenizer_train import BrainTokenizer\n"
        "from corpus_builder.readers import ZarrCorpus\n"
        "tok = BrainTokenizer.from_pretrained(sys.argv[1])\n"
        "corpus = ZarrCorpus(sys.argv[2])\n"
        "codes = tok.encode(corpus[corpus.keys()[0]])\n"
        "assert codes.shape == (4, 450) and int(codes.max()) < 32, codes.shape\n"
        "print(tuple(tok.codebook.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out" / "tokenizer"), str(corpus)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "(32, 16)"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_ray_train_two_workers_zero_stage_trains_and_exports(corpus, tiny_llm_dir, tmp_path, stage):
    import ray

    from cluster.launch import run_training

    root = Path(__file__).parents[1]
    cfg = tiny_cfg(tiny_llm_dir, steps=4, checkpoint_every=2, eval_every=4,
                   deepspeed=str(root / "configs" / "deepspeed" / f"zero{stage}.json"))
    try:
        metrics = run_training(train, cfg, TokenizerInputs(corpus, tmp_path / "out"), workers=2, log_fn=None,
                               storage=tmp_path / "ray", name=f"zero{stage}")
    finally:
        ray.shutdown()
    assert "val/reconstruction_r2" in metrics
    from tokenizer_train import BrainTokenizer

    tok = BrainTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert tok.encode(torch.zeros(T, 450)).shape == (4, 450)


@pytest.mark.slow
def test_torchrun_two_ranks_run_the_same_code(corpus, tiny_llm_dir, tmp_path):
    root = Path(__file__).parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "fmrilm.cli",
           "tokenizer", "train", "--corpus", str(corpus), "--out", str(tmp_path / "out"),
           "--deepspeed", str(root / "configs" / "deepspeed" / "zero2.json"), "--set", f"workdir={tmp_path / 'w'}",
           "--set", "tokenizer.model={length: 32, patch: 8, dim: 16, depth: 1, heads: 2, codebook_size: 32, "
           "code_dim: 8, llm_dim: 16, decoder_depth: 1}", "--set", f"tokenizer.text.llm={tiny_llm_dir}",
           "--set", "tokenizer.steps=4", "--set", "tokenizer.batch_size=2", "--set", "tokenizer.checkpoint_every=2",
           "--set", "tokenizer.eval_every=4", "--set", "tokenizer.text.text_batch=32"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=root, timeout=600)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    from tokenizer_train import BrainTokenizer

    assert BrainTokenizer.from_pretrained(tmp_path / "out" / "tokenizer").encode(torch.zeros(T, 450)).shape == (4, 450)
