import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, flatten, load_config, save_resolved

ROOT = Path(__file__).parents[1]
FMRILM = str(Path(sys.executable).parent / "fmrilm")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_config_validates_and_defaults_fill_in():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.name == "demo"
    assert cfg.corpus.source.cleaning.tr == 2.0 and cfg.corpus.source.cleaning.length == 160
    assert cfg.corpus.source.atlas.n_rois == 450


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
    proc = subprocess.run([FMRILM, "config", "--config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "synth.subjects" in lines[0] and str(path) in lines[0]


def test_cli_config_prints_overrides(tmp_path):
    proc = subprocess.run([FMRILM, "config", "--set", "synth.subjects=9"], capture_output=True, text=True,
                          check=True)
    assert yaml.safe_load(proc.stdout)["synth"]["subjects"] == 9
