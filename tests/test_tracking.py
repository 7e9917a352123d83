"""The MLflow contract (docs/design.md), checked by opening the sqlite store the pipeline wrote."""

import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from fmrilm.tracking import INPUT_RUN_TAG, PARENT_TAG, Tracker


def runs_by_name(client, experiment="demo"):
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_pipeline_records_parent_children_params_and_lineage(tiny_pipeline):
    cfg, result, work = tiny_pipeline

    assert result.tracking_uri == f"sqlite:///{work.resolve() / 'mlflow.db'}"
    client = MlflowClient(result.tracking_uri)
    runs = runs_by_name(client)
    assert set(runs) == {"pipeline", "synth", "corpus", "tokenizer", "align", "instruct", "eval"}
    parent = runs["pipeline"]
    assert parent.info.run_id == result.run_id and parent.info.status == "FINISHED"
    assert PARENT_TAG not in parent.data.tags
    for child in ("synth", "corpus", "tokenizer", "align", "instruct", "eval"):
        assert runs[child].data.tags[PARENT_TAG] == parent.info.run_id
        assert runs[child].info.status == "FINISHED"
    # flattened config as params, --set overrides included
    assert parent.data.params["synth.seed"] == "11"
    assert parent.data.params["corpus.source.cleaning.length"] == "32"
    assert runs["synth"].data.params["subjects"] == "8"
    assert runs["corpus"].data.params["source.cleaning.tr"] == "2.0"
    # lineage: the timeseries stage names the run that produced its input
    assert runs["corpus"].data.tags[INPUT_RUN_TAG] == runs["synth"].info.run_id
    assert runs["corpus"].data.metrics["ok"] == 8
    assert runs["tokenizer"].data.tags[INPUT_RUN_TAG] == runs["corpus"].info.run_id
    assert runs["tokenizer"].data.params["model.dim"] == "16"
    assert "val/reconstruction_r2" in runs["tokenizer"].data.metrics
    assert {"tokenizer", "metrics.json"} <= {a.path for a in client.list_artifacts(runs["tokenizer"].info.run_id)}
    # stage 2 reads the tokenizer's output, its sizes from the corpus (12 ROIs), and keeps its model as artifacts
    assert runs["align"].data.tags[INPUT_RUN_TAG] == runs["tokenizer"].info.run_id
    assert runs["tokenizer"].data.params["model.n_rois"] == "12"
    assert "val/f2f_accuracy" in runs["align"].data.metrics
    assert {"brain.json", "metrics.json", "brain_tokenizer"} <= {
        a.path for a in client.list_artifacts(runs["align"].info.run_id)}
    # stage 3 tunes the aligned folder, the eval stage scores the tuned one; both keep their outputs as artifacts
    assert runs["instruct"].data.tags[INPUT_RUN_TAG] == runs["align"].info.run_id
    assert runs["eval"].data.tags[INPUT_RUN_TAG] == runs["instruct"].info.run_id
    assert "val/answer_loss" in runs["instruct"].data.metrics
    assert {"brain.json", "metrics.json"} <= {a.path for a in client.list_artifacts(runs["instruct"].info.run_id)}
    assert {"metrics.json", "report.html"} <= {a.path for a in client.list_artifacts(runs["eval"].info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(runs["corpus"].info.run_id)}
    assert {"norms.json", "summary.json", "rois.tsv", "reference.npz", "config.resolved.yaml"} <= artifacts
    # the resolved config sits next to every output
    for folder in (work, work / "source", work / "corpus"):
        assert "seed: 11" in (folder / "config.resolved.yaml").read_text()


def test_tracking_uri_env_wins(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    tracker = Tracker.for_workdir(tmp_path / "work", "exp")
    with tracker.run("stage", params={"a": 1}) as run:
        run.log_metrics({"loss": 0.5}, step=3)
    assert store.exists() and not (tmp_path / "work" / "mlflow.db").exists()
    got = MlflowClient(f"sqlite:///{store}").get_run(run.run_id)
    assert got.data.params == {"a": "1"} and got.data.metrics == {"loss": 0.5}


def test_failed_stage_is_marked_failed(tmp_path):
    tracker = Tracker.for_workdir(tmp_path, "exp")
    try:
        with tracker.run("stage") as run:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert tracker.client.get_run(run.run_id).info.status == "FAILED"


# a child process's script starts with this: a Tracker on the workdir given as its first argument
_OPEN_TRACKER = ("import sys, time; from pathlib import Path; from fmrilm.tracking import Tracker\n"
                 "t = Tracker.for_workdir(Path(sys.argv[1]), 'exp')\n")


def _runs_in(workdir):
    """The runs of experiment 'exp' in the workdir's sqlite store."""
    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("exp").experiment_id])


def test_only_rank_zero_writes(tmp_path):
    code = (
        _OPEN_TRACKER +
        "with t.run('stage', params={'a': 1}) as r:\n"
        "    r.log_metrics({'x': 1.0}); print(r.run_id)\n"
    )
    for rank in ("1", "0"):
        env = {**__import__("os").environ, "RANK": rank}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        assert (out == "None") == (rank == "1")
    assert len(_runs_in(tmp_path)) == 1


def test_stages_started_together_on_a_fresh_store_all_open_their_runs(tmp_path):
    # two `bench/tokenizer_quality.py --runs ...` started at once on a new workdir used to race on creating the
    # sqlite tables ("duplicate column name: step") and one of them died
    code = (
        _OPEN_TRACKER +
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together, imports done\n"
        "with t.run('stage-' + sys.argv[3]) as r:\n"
        "    r.log_metrics({'x': 1.0})\n"
    )
    start = time.time() + 8.0
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start), str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-600:] for e in errors)
    assert len(_runs_in(tmp_path)) == 4


def test_a_stage_killed_with_sigterm_is_marked_failed(tmp_path):
    code = (
        _OPEN_TRACKER +
        "with t.run('stage'):\n"
        "    (Path(sys.argv[1]) / 'started').touch()\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "started").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    (run,) = _runs_in(tmp_path)
    assert run.info.status == "FAILED"
