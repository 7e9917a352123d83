"""The cluster launchers (cluster/slurm, cluster/k8s) are templates no scheduler runs here: render them, check their
syntax and schema, and walk the SLURM script through a fake allocation (srun, scontrol, ray and fmrilm replaced by
shims that record what they were asked to do)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm" / "fmrilm.sbatch"
RAYJOB = ROOT / "cluster" / "k8s" / "rayjob.yaml"

K8S_VALUES = {
    "FMRILM_JOB_NAME": "fmrilm-test", "FMRILM_IMAGE": "registry.example/fmrilm:0.1.0", "RAY_VERSION": "2.60.0",
    "FMRILM_PROJECT_DIR": "/opt/fmrilm", "FMRILM_CONFIG": "configs/ukb_abcd.yaml", "FMRILM_SHARED_PVC": "fmrilm-data",
    "FMRILM_SHARED_MOUNT": "/shared", "FMRILM_KEY_SECRET": "fmrilm-pseudonym", "FMRILM_WORKERS": "4",
    "MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "FMRILM_GPUS_PER_WORKER": "8",
    "FMRILM_CPUS_PER_WORKER": "64", "FMRILM_MEMORY_PER_WORKER": "512Gi",
}


# --- KubeRay RayJob ---------------------------------------------------------------------------------------------

def render_rayjob(values: dict[str, str]) -> dict:
    """What `envsubst` limited to the template's variables does; a missing value is a KeyError."""
    return yaml.safe_load(re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], RAYJOB.read_text()))


def test_rayjob_variables_are_the_documented_ones():
    text = RAYJOB.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_]+)\}", body))
    documented = set(re.findall(r"^#   \$\{([A-Z_]+)\}", text, flags=re.M))
    assert used == documented == set(K8S_VALUES)
    assert "$" not in re.sub(r"\$\{[A-Z_]+\}", "", body)  # nothing else for envsubst to touch
    with pytest.raises(KeyError):  # a variable left unset is an error, not an empty string
        render_rayjob({k: v for k, v in K8S_VALUES.items() if k != "FMRILM_IMAGE"})


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="needs envsubst (gettext)")
def test_rayjob_renders_with_the_documented_envsubst_command():
    line = next(x for x in RAYJOB.read_text().splitlines() if x.startswith("#   envsubst "))
    command = line.lstrip("# ").rstrip("\\").strip() + " < cluster/k8s/rayjob.yaml"
    env = {**os.environ, **K8S_VALUES, "HOME": "/nowhere"}
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout) == render_rayjob(K8S_VALUES)


def test_rayjob_has_what_kuberay_needs():
    job = render_rayjob(K8S_VALUES)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"] == "fmrilm-test"
    spec = job["spec"]
    assert "python -m fmrilm.cli pipeline --config configs/ukb_abcd.yaml" in spec["entrypoint"]
    assert "--workdir /shared/runs/fmrilm-test" in spec["entrypoint"]  # outputs on the shared volume
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert len(groups) == 2 and cluster["workerGroupSpecs"][0]["replicas"] == 4
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "fmrilm-data"
        for container in pod["containers"]:
            assert container["image"] == "registry.example/fmrilm:0.1.0"
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert set(mounts) <= set(volumes)  # every mount names a volume of the pod
            assert mounts["shared"] == "/shared"  # the same path on every pod
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
            # the pseudonym key is a mounted file, never an env value
            assert "FMRILM_PSEUDONYM_KEY" not in env
            assert Path(env["FMRILM_PSEUDONYM_KEY_FILE"]).parent == Path(mounts["pseudonym-key"])
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8


# --- SLURM ------------------------------------------------------------------------------------------------------

def test_sbatch_is_valid_bash_with_scheduler_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in directives  # one Ray node per allocated node
    assert any(d.startswith("#SBATCH --nodes=") for d in directives)


SHIMS = {
    # srun [options] CMD...: run CMD "on" the node named by -w
    "srun": r"""
node=local
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in -w) node=$2; shift 2;; *) shift;; esac
done
export FAKE_NODE=$node
if [[ $1 == hostname ]]; then echo "10.0.0.1 fe80::1"; exit 0; fi
exec "$@"
""",
    "scontrol": r"""[[ "$1 $2" == "show hostnames" ]] && tr ' ' '\n' <<< "$FAKE_NODES" """,
    # ray start ... --block: record, then block until the script's shutdown ends it
    "ray": r"""
trap 'kill $child 2>/dev/null; echo "ray@$FAKE_NODE stopped" >> "$FAKE_LOG"; exit 0' TERM
sleep 60 & child=$!
echo "ray@$FAKE_NODE $*" >> "$FAKE_LOG"
wait $child
""",
    # python - ADDRESS N TIMEOUT (the wait-for-nodes snippet): until N nodes have started
    "python": r"""
cat > /dev/null
until (( $(grep -c '^ray@.* start ' "$FAKE_LOG" 2>/dev/null) >= $3 )); do sleep 0.05; done
echo "wait-for-nodes $3 (RAY_ADDRESS $2)" >> "$FAKE_LOG"
""",
    "fmrilm": r"""echo "fmrilm $* (RAY_ADDRESS $RAY_ADDRESS)" >> "$FAKE_LOG"; exit "${FAKE_STATUS:-0}" """,
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in SHIMS.items():
        shim = bin_dir / name
        shim.write_text("#!/bin/bash\n" + body.strip() + "\n")
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "FAKE_NODES": "gpu1 gpu2 gpu3", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[1-3]",
           "SLURM_CPUS_ON_NODE": "16", "SLURM_SUBMIT_DIR": str(tmp_path), "FMRILM_SETUP": ":"}
    return env, log


@pytest.mark.parametrize("gpu_env, gpus", [({"SLURM_GPUS_ON_NODE": "4"}, 4),
                                           ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
                                           ({"SLURM_JOB_GPUS": "0,1"}, 2),
                                           ({}, 0)])
def test_sbatch_starts_head_and_one_worker_per_node_runs_the_pipeline_and_shuts_down(fake_slurm, gpu_env, gpus):
    env, log = fake_slurm
    run = subprocess.run(["bash", str(SBATCH), "--set", "workers=8"], env={**env, **gpu_env},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    calls = log.read_text().splitlines()
    head = [c for c in calls if c.startswith("ray@gpu1 start")]
    workers = [c for c in calls if c.startswith(("ray@gpu2 start", "ray@gpu3 start"))]
    assert len(head) == 1 and "--head" in head[0] and "--node-ip-address=10.0.0.1" in head[0]
    assert len(workers) == 2 and all("--address=10.0.0.1:6379" in w for w in workers)
    for start in head + workers:
        assert f"--num-gpus={gpus}" in start and "--num-cpus=16" in start and "--temp-dir=/tmp/ray-42" in start
    # order: head up, then the workers, all of them up, then the pipeline on the cluster, then shutdown
    assert calls.index("wait-for-nodes 1 (RAY_ADDRESS 10.0.0.1:6379)") < calls.index(workers[0])
    pipeline = "fmrilm pipeline --config configs/ukb_abcd.yaml --set workers=8 (RAY_ADDRESS 10.0.0.1:6379)"
    assert calls.index("wait-for-nodes 3 (RAY_ADDRESS 10.0.0.1:6379)") < calls.index(pipeline)
    assert {c for c in calls[calls.index(pipeline) + 1:]} == {f"ray@gpu{i} stopped" for i in (1, 2, 3)}


def test_sbatch_passes_the_pipeline_status_and_workdir(fake_slurm):
    env, log = fake_slurm
    run = subprocess.run(["bash", str(SBATCH)], env={**env, "FAKE_STATUS": "3", "FMRILM_CONFIG": "configs/demo.yaml",
                                                     "FMRILM_WORKDIR": "/shared/runs/demo"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    calls = log.read_text().splitlines()
    assert "fmrilm pipeline --config configs/demo.yaml --workdir /shared/runs/demo (RAY_ADDRESS 10.0.0.1:6379)" in calls
    assert sum(c.endswith("stopped") for c in calls) == 3  # shut down on failure too
