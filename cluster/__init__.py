"""cluster: the launchers, what starts fMRI-LM's work on machines other than the one a command runs on. It imports
nothing of the `fmrilm` entry package: the entry calls the launchers, never the other way round.

Public API:
- `cluster.launch`: `run_training(train_fn, cfg, inputs, ...)` runs a training stage in-process or on Ray Train
  workers (the code in `loop` runs on the workers), `checkpoint_step(out)` reads its checkpoint layout;
- `cluster.jobs`: Ray Jobs (`connect`, `submit`, `follow`, `info`, `logs`, `stop`, `list_jobs`): a command sent to
  the cluster's head, where it runs as `python -m fmrilm.cli ...`;
- `cluster.address`: whether a Ray cluster answers at an address (`probe_ray`, `probe_dashboard`), in seconds;
- `cluster.logs`: `quiet_third_party` and `QUIET_ENV`, what reaches the logs of the processes it starts;
- `cluster/slurm/fmrilm.sbatch` and `cluster/k8s/rayjob.yaml`: templates that start a Ray cluster under SLURM or
  KubeRay and run `fmrilm pipeline` on it.
"""
