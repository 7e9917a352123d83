import json
import subprocess
from pathlib import Path

import pytest
import yaml

from fmrilm.config import ConfigError, flatten, load_config, save_resolved
from tests.conftest import FMRILM

ROOT = Path(__file__).parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_config_validates_and_defaults_fill_in():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.name == "demo"
    assert cfg.corpus.source.cleaning.tr == 2.0 and cfg.corpus.source.cleaning.length == 160
    assert cfg.corpus.source.atlas.n_rois is None  # read from the sources (450 for the synthetic cohort)


def test_unknown_key_names_key_path_and_file(tmp_path):
    path = write(tmp_path, "synth:\n  subjectz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg and "synth.subjectz" in msg and "unknown key" in msg


def test_wrong_type_names_key_path(tmp_path):
    path = write(tmp_path, "corpus:\n  source:\n    cleaning:\n      tr: fast\n")
    with pytest.raises(ConfigError, match=r"corpus\.source\.cleaning\.tr"):
        load_config(path)


def test_set_overrides_are_validated_like_the_file(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["synth.subjects=7", "synth.datasets=[HCP]"])
    assert cfg.synth.subjects == 7 and cfg.synth.datasets == ["HCP"]
    with pytest.raises(ConfigError, match=r"synth\.nope.*unknown key"):
        load_config(None, ["synth.nope=1"])
    with pytest.raises(ConfigError, match=r"synth\.subjects"):
        load_config(None, ["synth.subjects=-3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["synth.subjects"])


def test_one_optimizer_config_with_each_stages_defaults():
    from fmrilm_core.config import OptimConfig

    cfg = load_config(None, ["tokenizer.optim={lr: 0.002}", "align.optim.lr=0.003", "instruct.optim={warmup_steps: 3}"])
    assert all(isinstance(getattr(cfg, s).optim, OptimConfig) for s in ("tokenizer", "align", "instruct"))
    # a partial section keeps its stage's defaults for the rest: stage 1's ...
    tok = cfg.tokenizer.optim
    assert (tok.lr, tok.weight_decay, tok.warmup_steps, tok.min_lr_ratio, tok.domain_lr_scale) == \
        (0.002, 0.05, 100, 0.0, 5.0)
    # ... and stages 2 and 3's
    assert (cfg.align.optim.lr, cfg.align.optim.weight_decay, cfg.align.optim.warmup_steps,
            cfg.align.optim.min_lr_ratio) == (0.003, 0.0, 20, 0.1)
    assert cfg.instruct.optim == OptimConfig(warmup_steps=3)
    for stage in ("tokenizer", "align", "instruct"):  # the same checks in every stage
        with pytest.raises(ConfigError, match=rf"{stage}\.optim\.min_lr_ratio"):
            load_config(None, [f"{stage}.optim.min_lr_ratio=2"])
        with pytest.raises(ConfigError, match=rf"{stage}\.optim\.lr"):
            load_config(None, [f"{stage}.optim.lr=0"])
    with pytest.raises(ConfigError, match=r"align\.optim\.domain_lr_scale.*unknown key"):  # stage 1's alone
        load_config(None, ["align.optim.domain_lr_scale=2"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=5"])
    path = save_resolved(cfg, tmp_path)
    assert load_config(path) == cfg
    assert flatten(cfg)["seed"] == "5"
    assert flatten(cfg)["corpus.source.cleaning.tr"] == "2.0"


def test_cli_rejects_bad_config_with_one_line(tmp_path):
    path = write(tmp_path, "synth:\n  subjects: many\n")
    proc = subprocess.run([*FMRILM, "config", "--config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "synth.subjects" in lines[0] and str(path) in lines[0]


def test_cli_config_prints_overrides(tmp_path):
    proc = subprocess.run([*FMRILM, "config", "--set", "synth.subjects=9"], capture_output=True, text=True,
                          check=True)
    assert yaml.safe_load(proc.stdout)["synth"]["subjects"] == 9


def test_paper_scale_config_validates_with_fmrilm_config():
    path = ROOT / "configs" / "ukb_abcd.yaml"
    proc = subprocess.run([*FMRILM, "config", "--config", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    cfg = load_config(path)
    assert printed["name"] == cfg.name == "ukb_abcd"
    # UKB + ABCD from named placeholders on shared storage; norms from UKB
    assert [s.split(":", 1)[0] for s in cfg.corpus.sources] == ["ukb_csv", "abcd_cifti"]
    assert all(s.split(":", 1)[1].startswith("/shared/") for s in cfg.corpus.sources)
    assert str(cfg.corpus.source.atlas.cifti_labels).startswith("/shared/") and cfg.corpus.reference.dataset == "UKB"
    # 450 ROIs, T 160 at TR 2 s, P 16, K 8192, Qwen3-0.6B (width 1024) by local path for both stages
    assert cfg.corpus.source.atlas.n_rois == cfg.tokenizer.model.n_rois == 450
    assert cfg.corpus.source.cleaning.length == cfg.tokenizer.model.length == 160
    assert cfg.corpus.source.cleaning.tr == 2.0
    m = cfg.tokenizer.model
    assert (m.patch, m.codebook_size, m.llm_dim) == (16, 8192, 1024)
    assert cfg.align.base == cfg.tokenizer.text.llm and Path(cfg.align.base).name == "Qwen3-0.6B"
    assert Path(cfg.align.base).is_absolute()
    # ZeRO-2 for the tokenizer, ZeRO-3 for the LLM (configs that exist), bf16, AdamW lr 1e-4 cosine, global batch 32
    stages = {name: json.loads((ROOT / getattr(cfg, name).deepspeed).read_text())["zero_optimization"]["stage"]
              for name in ("tokenizer", "align")}
    assert stages == {"tokenizer": 2, "align": 3}
    for stage in (cfg.tokenizer, cfg.align):
        assert stage.precision == "bf16"
        assert (stage.optim.lr, stage.optim.schedule) == (1e-4, "cosine")
        assert stage.batch_size * cfg.workers == 32
    assert cfg.workers == 8  # one Ray Train worker per GPU of one 8-GPU node


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")))
def test_every_deepspeed_config_builds_an_engine_that_steps(name):
    import torch

    from fmrilm_core.engine import build_engine, deepspeed_config

    ds = deepspeed_config(ROOT / "configs" / "deepspeed" / name, micro_batch=2, grad_clip=1.0, lr=1e-2,
                          betas=(0.9, 0.95), weight_decay=0.0, precision="fp32")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    engine, _ = build_engine(model, list(model.parameters()), ds, lambda step: 1.0)
    x = torch.randn(2, 8)
    losses = []
    for _ in range(3):
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
