"""Shared fixtures: tiny configs and a tiny synthetic cohort, so the default suite stays fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config

# A small but real pipeline: 4 subjects, short scans, T = 32.
TINY = ["synth.subjects=4", "synth.length_scale=0.3", "synth.datasets=[UKB,ABCD]",
        "corpus.source.cleaning.length=32"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config(tmp_path):
    return load_config(Path(__file__).parents[1] / "configs" / "demo.yaml",
                       TINY + [f"workdir={tmp_path / 'work'}"])


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One real pipeline run (synth -> Ray corpus build, MLflow sqlite) shared by the tests that inspect it."""
    import ray

    from cluster.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("pipeline") / "work"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", TINY + ["synth.seed=11"])
    result = run_pipeline(cfg, work)
    ray.shutdown()
    return cfg, result, work


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """Tests choose their own store; a developer's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FMRILM_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("FMRILM_PSEUDONYM_KEY_FILE", raising=False)
