"""`fmrilm submit` / `fmrilm jobs` against a real 2-node Ray cluster on this machine.

The cluster is two `ray start --block` processes (a head with the dashboard and one worker node, 1 CPU each),
each with its own --temp-dir, so nothing here touches /tmp/ray, where other Ray instances on the machine record
themselves (ray.cluster_utils.Cluster would write /tmp/ray/ray_current_cluster, and any bare ray.init() on the
machine would then attach to it). Token authentication is on, with a token of its own, as Ray turns it on by
default from 2.61. The nodes run with the venv's bin first on PATH, as nodes whose environment is activated.
The CLI runs as a subprocess (`python -m fmrilm.cli`, what the console script runs) end to end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import jobs
from fmrilm_core.errors import InputError
from tests.conftest import FMRILM, tiny_sets

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FMRILM_PSEUDONYM", "MLFLOW_"))}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


class RayCluster:
    """Two `ray start --block` process groups; `close()` ends them and removes their temp dirs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fmrilm-ray-", dir="/tmp"))  # short: Ray's socket paths
        self.token_file = self.root / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.node_env = _clean_env(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file),
                                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s drain on SIGTERM
        self.procs: list[subprocess.Popen] = []
        gcs, dashboard = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        self._start("head", ["--head", "--port", str(gcs), "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--ray-client-server-port", str(_free_port())])
        self._wait(lambda: self._get("/api/version") is not None, "the dashboard")
        self._start("worker", ["--address", f"127.0.0.1:{gcs}"])
        self._wait(lambda: self.alive_nodes() == 2, "two alive nodes")

    def _start(self, name: str, args: list[str]) -> None:
        # fixed default ports would collide with other Ray instances on the machine: every listener gets a free one
        cmd = [str(VENV_BIN / "ray"), "start", *args, "--block", "--num-cpus", "1", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / name),
               "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())]
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.node_env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _get(self, path: str):
        request = urllib.request.Request(self.address + path,
                                         headers={"Authorization": f"Bearer {self.token_file.read_text()}"})
        try:
            with urllib.request.urlopen(request, timeout=3) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> int:
        nodes = self._get("/api/v0/nodes?limit=10") or {}
        return sum(n.get("state") == "ALIVE" for n in nodes.get("data", {}).get("result", {}).get("result", []))

    def _wait(self, ready, what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(1)
        logs = "\n".join((self.root / f).read_text()[-2000:] for f in ("head.log", "worker.log")
                         if (self.root / f).exists())
        self.close()
        raise RuntimeError(f"Ray test cluster: no {what}\n{logs}")

    def close(self) -> None:
        # only the process groups started here (`ray stop` would end every Ray instance on the machine)
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # raylets, workers and agents left behind in the group
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of this `ray start` (start_new_session): pgid == its pid
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.close()


def fmrilm(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FMRILM, *args], env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def client_env(cluster: RayCluster, **extra: str) -> dict[str, str]:
    return _clean_env(RAY_AUTH_TOKEN_PATH=str(cluster.token_file), **extra)


def test_submit_follow_runs_on_the_cluster_and_logs_to_mlflow(ray_cluster, tmp_path):
    work = tmp_path / "work"
    out = fmrilm("submit", "--address", ray_cluster.address, "--follow", "--", "synth", "--out", str(tmp_path / "src"),
                 "--subjects", "4", "--set", "synth.length_scale=0.3", "--set", f"workdir={work}",
                 env=client_env(ray_cluster))
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "synthetic cohort:" in out.stdout  # the job's log, streamed
    assert out.stderr.strip().splitlines()[-1].startswith(f"{job_id}: SUCCEEDED")

    assert (tmp_path / "src" / "participants.tsv").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [(r.info.run_name, r.info.status) for r in runs] == [("synth", "FINISHED")]
    assert runs[0].data.metrics["subjects"] == 4

    status = fmrilm("jobs", "status", job_id, "--address", ray_cluster.address, env=client_env(ray_cluster))
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED")
    assert "python -m fmrilm.cli synth" in status.stdout
    logs = fmrilm("jobs", "logs", job_id, "--address", ray_cluster.address, env=client_env(ray_cluster))
    assert logs.returncode == 0 and "synthetic cohort:" in logs.stdout
    stop = fmrilm("jobs", "stop", job_id, "--address", ray_cluster.address, env=client_env(ray_cluster))
    assert stop.returncode == 0 and "already finished" in stop.stdout


def test_failing_entrypoint_exits_nonzero_with_its_status(ray_cluster, tmp_path):
    out = fmrilm("submit", "--address", ray_cluster.address, "--follow", "--", "synth", "--out", str(tmp_path / "x"),
                 "--set", "no_such_key=1", env=client_env(ray_cluster))
    assert out.returncode == 1, out.stdout + out.stderr
    job_id = out.stdout.splitlines()[0]
    assert "no_such_key" in out.stdout  # the command's own one-line error, in the job's log
    assert out.stderr.strip().splitlines()[-1].startswith(f"{job_id}: FAILED")
    assert "exit code 2" in out.stderr.strip().splitlines()[-1]
    status = fmrilm("jobs", "logs", job_id, "--follow", "--address", ray_cluster.address, env=client_env(ray_cluster))
    assert status.returncode == 1 and "no_such_key" in status.stdout


@pytest.mark.slow  # one more job start (10-20 s on 2 cores) for a verb the fast tests reach on a finished job
def test_stop_a_running_job(ray_cluster, tmp_path):
    out = fmrilm("submit", "--address", ray_cluster.address, "--", "synth", "--out", str(tmp_path / "big"),
                 "--subjects", "5000", "--set", f"workdir={tmp_path / 'work'}", env=client_env(ray_cluster))
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    stop = fmrilm("jobs", "stop", job_id, "--address", ray_cluster.address, env=client_env(ray_cluster))
    assert stop.returncode == 0 and stop.stdout.startswith(f"{job_id}: stop requested"), stop.stdout + stop.stderr
    status = fmrilm("jobs", "logs", job_id, "--follow", "--address", ray_cluster.address, env=client_env(ray_cluster))
    assert status.returncode == 1 and f"{job_id}: STOPPED" in status.stderr


def test_unknown_job_id_is_a_one_line_error(ray_cluster):
    for verb in ("status", "logs", "stop"):
        out = fmrilm("jobs", verb, "raysubmit_nosuchjob", "--address", ray_cluster.address,
                     env=client_env(ray_cluster))
        assert out.returncode == 2
        assert out.stderr.strip() == f"error: no job 'raysubmit_nosuchjob' on the cluster at {ray_cluster.address}"


def test_token_missing_or_wrong_is_a_one_line_error(ray_cluster, tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    missing = fmrilm("jobs", "list", "--address", ray_cluster.address, env=_clean_env(HOME=str(home)))
    wrong = fmrilm("jobs", "list", "--address", ray_cluster.address, env=_clean_env(RAY_AUTH_TOKEN="not-it"))
    assert missing.returncode == wrong.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == len(wrong.stderr.strip().splitlines()) == 1
    assert "requires an auth token" in missing.stderr and "rejected the auth token from RAY_AUTH_TOKEN" in wrong.stderr


@pytest.mark.slow
def test_submit_a_small_pipeline_to_two_nodes(ray_cluster, tmp_path, tiny_llm_dir):
    """The whole tiny pipeline as one job: the corpus build fans out as Ray tasks over both nodes."""
    work = tmp_path / "work"
    sets = [arg for item in tiny_sets(tiny_llm_dir) for arg in ("--set", item)]
    out = fmrilm("submit", "--address", ray_cluster.address, "--follow", "--", "pipeline", "--config",
                 "configs/demo.yaml", "--workdir", str(work), *sets, env=client_env(ray_cluster))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (work / "corpus" / "manifest.parquet").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = {r.info.run_name: r.info.status for r in client.search_runs([client.get_experiment_by_name("demo")
                                                                        .experiment_id])}
    assert {"pipeline", "synth", "corpus", "tokenizer"} <= set(runs)  # and every later stage that exists
    assert set(runs.values()) == {"FINISHED"}


# --- no cluster needed ------------------------------------------------------------------------------------------

def test_unreachable_address_fails_in_seconds_with_one_line():
    port = _free_port()  # nothing listens there
    for args in (["submit", "--address", f"http://127.0.0.1:{port}", "--", "synth", "--out", "/tmp/never"],
                 ["jobs", "status", "raysubmit_x", "--address", f"127.0.0.1:{port}"]):
        start = time.monotonic()
        out = fmrilm(*args)
        assert time.monotonic() - start < 20
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip().splitlines() == [out.stderr.strip()]
        assert out.stderr.startswith(f"error: no Ray dashboard answers at http://127.0.0.1:{port}")


def test_corpus_build_probes_its_ray_address_first(tmp_path):
    """`corpus build --address` (or $RAY_ADDRESS) names a Ray cluster as ray.init takes it: probed like the dashboard
    above, one line in seconds instead of Ray's minute of connection retries."""
    port = _free_port()  # nothing listens there
    args = ["corpus", "build", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "corpus")]
    for extra, env in ((["--address", f"127.0.0.1:{port}"], _clean_env()),
                       ([], _clean_env(RAY_ADDRESS=f"127.0.0.1:{port}"))):
        start = time.monotonic()
        out = fmrilm(*args, *extra, env=env)
        assert time.monotonic() - start < 20
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip().splitlines() == [out.stderr.strip()]
        assert out.stderr.startswith(f"error: no Ray cluster answers at 127.0.0.1:{port} (")
    assert not (tmp_path / "corpus").exists()
    dashboard = fmrilm(*args, "--address", f"http://127.0.0.1:{port}")  # `submit`'s kind of address
    assert dashboard.returncode == 2
    assert dashboard.stderr.startswith(f"error: address 'http://127.0.0.1:{port}': give the Ray cluster as HOST:PORT")


def test_pseudonym_secret_by_value_is_refused_before_any_connection():
    out = fmrilm("submit", "--address", "http://127.0.0.1:1", "--", "synth", "--out", "/tmp/never",
                 env=_clean_env(FMRILM_PSEUDONYM_KEY="k" * 32))
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: FMRILM_PSEUDONYM_KEY holds the pseudonym secret by value, which a job "
                                  "never carries: put the key in a file on the cluster and set "
                                  "FMRILM_PSEUDONYM_KEY_FILE to its path")
    via_env = fmrilm("submit", "--address", "http://127.0.0.1:1", "--env", "FMRILM_PSEUDONYM_KEY=abc", "--",
                     "synth", "--out", "/tmp/never")
    assert via_env.returncode == 2 and "by value" in via_env.stderr


def test_runtime_env_carries_the_project_and_references_only(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("FMRILM_PSEUDONYM_KEY_FILE", "/shared/secrets/pseudonym.key")
    env = jobs.runtime_env({"HF_HOME": "/shared/hf"})
    assert env["working_dir"] == str(ROOT)
    assert {"runs/", ".venv/", ".git/", "mlruns/", "*.db", "__pycache__/"} <= set(env["excludes"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["env_vars"]["FMRILM_PSEUDONYM_KEY_FILE"] == "/shared/secrets/pseudonym.key"
    assert env["env_vars"]["HF_HOME"] == "/shared/hf"
    assert "FMRILM_PSEUDONYM_KEY" not in env["env_vars"]

    monkeypatch.setenv("FMRILM_PSEUDONYM_KEY_FILE", str(ROOT / "configs" / "key.txt"))  # would be uploaded
    with pytest.raises(InputError, match="inside the project folder"):
        jobs.runtime_env()
    monkeypatch.setenv("FMRILM_PSEUDONYM_KEY_FILE", "key.txt")
    with pytest.raises(InputError, match="absolute path"):
        jobs.runtime_env()


def test_entrypoint_and_addresses():
    assert jobs.entrypoint(["fmrilm", "pipeline", "--set", "tokenizer.model={dim: 16}"]) == \
        "python -m fmrilm.cli pipeline --set 'tokenizer.model={dim: 16}'"
    assert jobs.entrypoint(["synth", "--out", "/s"]) == "python -m fmrilm.cli synth --out /s"
    with pytest.raises(InputError):
        jobs.entrypoint(["fmrilm"])
    assert jobs.resolve_address("head:8265") == "http://head:8265"
    assert jobs.resolve_address("https://ray.example/") == "https://ray.example"
    for bad in ("auto", "ray://head:10001"):
        with pytest.raises(InputError, match="dashboard's HTTP address"):
            jobs.resolve_address(bad)
    assert jobs.relative_outputs(["pipeline", "--workdir", "runs/x", "--out=/abs", "--set", "workdir=w2",
                                  "-o", "s3://bucket/x"]) == ["runs/x", "w2"]
