"""Benchmark: the corpus build (`build_corpus` on Ray) against the work alone, and its 2-worker speed-up.

    python bench/build.py [--scans 400] [--workdir DIR] [--repeat 1] [--shard-size 64]

A synthetic cohort in the tables layout (UKB + ABCD scan lengths, N = 450 ROIs, T = 160 after cleaning; written
once, reused from --workdir) is processed three ways, each in its own subprocess (fresh Ray, fresh BLAS pools),
interleaved, on the same scans:
    baseline  the work alone: discovery, load + clean (`sources.extract`) and the 23 descriptors
              (`compute_descriptors`) of every scan in a multiprocessing Pool(2) (one BLAS thread per process),
              with the reference fitted the way the build fits it (same scans, same seed, in the parent);
    build x2  `build_corpus` with corpus.build.workers=2 into a fresh folder;
    build x1  the same with workers=1.
Build rates leave out `ray.init` (a once-per-session cost; printed beside them); the baseline pays for its
pool start. Prints the rates and ratios, build x2 / baseline (target >= 0.8) and build x2 / build x1 (target
>= 1.7 on 2 cores), and where the build's time went: Ray start, the three passes of shard tasks and the
driver's work between them (reference fit, norms), and per pass how busy the workers were and what share of
a core each task got (a share well below 1 on a CPU-bound pass means other processes took the cores: on a
shared machine, read the speed-up with it).

    python bench/build.py --add [--scans 400] [--new-share 0.1] [--workdir DIR] [--repeat 1]

Add mode (`fmrilm corpus add`): the cohort's subjects split into a base (90 %) and a new wave (10 %, hard links);
the base corpus is built once, then interleaved in subprocesses: `add` (a fresh copy of the base corpus, the new
wave added) against `alone` (a corpus built from the new wave's scans alone), both on 2 Ray workers, Ray's start
left out. Prints add / alone (target <= 1.2) and what the add did to the base corpus's shard files (tars,
manifest parts, markers, zarr blocks): read (their access time, reset to 0 before the add, moves on any read
under relatime or strictatime) and written (content hash), in files and bytes (target: none).
Measured (2026-12-07, the quiet 2-core machine, 40 scans added to 360): add / alone 0.93; of the base corpus's 63
shard files none read, none written (docs/results.md#adding-to-a-corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASETS = ["UKB", "ABCD"]


# ---- child: the baseline ------------------------------------------------------------------------------

def _extract_one(args):
    from corpus_builder import sources

    record, source_cfg = args
    return sources.extract(record, source_cfg)


def _describe_one(args):
    from corpus_builder.descriptors import compute_descriptors

    x, reference, tr = args
    return compute_descriptors(x, reference, tr).vector()


def run_baseline(source: Path, workers: int) -> dict:
    import multiprocessing as mp

    import pandas as pd

    from corpus_builder.atlas import roi_table
    from corpus_builder.extraction import discover_all
    from corpus_builder.norms import fit_reference
    from corpus_builder.splits import assign_splits
    from fmrilm.config import load_config

    cfg = load_config(None, []).corpus
    for thread_env in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[thread_env] = "1"  # the pool's processes, like Ray's 1-CPU workers; this process keeps its own
    start = time.perf_counter()
    records = discover_all([str(source)], cfg.source)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        series = pool.map(_extract_one, [(r, cfg.source) for r in records], chunksize=1)
        t_extract = time.perf_counter()
        ok = {r.key: x for r, (x, _) in zip(records, series) if x is not None}
        labels = next(labels for x, labels in series if x is not None)
        networks = roi_table(labels, cfg.source.atlas.lookup)["network"].to_numpy()
        # the reference cohort and its fit scans, as build_corpus chooses them
        table = pd.DataFrame({"key": [r.key for r in records], "subject": [r.subject for r in records],
                              "dataset": [r.dataset for r in records],
                              "diagnosis": [r.phenotypes.get("diagnosis") for r in records]})
        split_of = dict(zip(table["key"], assign_splits(table, tuple(cfg.splits.fractions), 0)))
        reference_keys = sorted(k for k in ok if split_of[k] == "train")
        rng = np.random.default_rng(0)
        fit_keys = sorted(rng.choice(reference_keys, min(len(reference_keys), cfg.reference.max_fit_scans),
                                     replace=False))
        reference = fit_reference([ok[k] for k in fit_keys], networks, cfg.descriptors, 0)
        t_fit = time.perf_counter()
        pool.map(_describe_one, [(x, reference, cfg.source.cleaning.tr) for x in ok.values()], chunksize=1)
    end = time.perf_counter()
    return {"scans": len(records), "ok": len(ok), "seconds": end - start,
            "phases": {"discover + extract": t_extract - start, "reference fit": t_fit - t_extract,
                       "describe": end - t_fit}}


# ---- child: one build ---------------------------------------------------------------------------------

def _timed_task(phase: str, fn, log_dir: str):
    """`fn` as it runs in a Ray worker, logging its wall and CPU time (one JSONL file per worker process)."""
    def task(*args, **kwargs):
        t0, c0 = time.time(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            line = {"phase": phase, "start": t0, "end": time.time(), "cpu": time.process_time() - c0}
            with open(Path(log_dir) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
    return task


def timed(clock: dict[str, float], name: str, fn):
    """`fn`, adding the seconds each call takes to clock[name]."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def run_build(source: Path, out: Path, workers: int, shard_size: int) -> dict:
    import ray

    import corpus_builder.build as build
    from fmrilm.config import load_config

    cfg = load_config(None, [f"corpus.build.workers={workers}", f"corpus.build.shard_size={shard_size}"]).corpus
    clock: dict[str, float] = {}
    ray.init = timed(clock, "ray start", ray.init)                # build._init_ray calls ray.init
    build.fit_reference = timed(clock, "reference fit", build.fit_reference)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    for phase in ("extract", "describe", "write"):
        setattr(build, f"{phase}_shard", _timed_task(phase, getattr(build, f"{phase}_shard"), str(log_dir)))

    start = time.time()
    summary = build.build_corpus([str(source)], cfg, out)
    end = time.time()
    tasks = [json.loads(line) for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    shutil.rmtree(log_dir)
    ray_start = clock.get("ray start", 0.0)
    passes = {}
    for phase in ("extract", "describe", "write"):
        mine = [t for t in tasks if t["phase"] == phase]
        first, last = min(t["start"] for t in mine), max(t["end"] for t in mine)
        busy = sum(t["end"] - t["start"] for t in mine)
        passes[phase] = {"first": first, "last": last, "wall": last - first, "task_wall": busy,
                         "task_cpu": sum(t["cpu"] for t in mine)}
    ex, de, wr = passes["extract"], passes["describe"], passes["write"]
    phases = {"ray start": ray_start,
              "discovery, plan, zarr": ex["first"] - start - ray_start,
              "extract pass": ex["wall"],
              "reference fit (driver)": de["first"] - ex["last"],
              "  of which fit_reference": clock["reference fit"],
              "describe pass": de["wall"],
              "norms fit (driver)": wr["first"] - de["last"],
              "write pass": wr["wall"],
              "manifest + summary": end - wr["last"]}
    return {"scans": summary["scans"], "ok": summary["ok"], "shards": summary["shards"], "workers": workers,
            "seconds": end - start - ray_start, "ray_start": ray_start, "phases": phases, "passes": passes}


def run_add(source: Path, out: Path) -> dict:
    import ray

    import corpus_builder.grow as grow

    clock = {"ray start": 0.0}
    ray.init = timed(clock, "ray start", ray.init)                # grow._init_ray calls ray.init
    start = time.perf_counter()
    result = grow.add_to_corpus([str(source)], out)
    seconds = time.perf_counter() - start - clock["ray start"]
    return {"scans": result["scans"], "shards": result["shards"], "seconds": seconds, "ray_start": clock["ray start"]}


def split_cohort(source: Path, share: float) -> tuple[Path, Path]:
    """The cohort's subjects as two roots of hard links: the base and the last `share` of subjects."""
    base, new = source.parent / f"{source.name}-base", source.parent / f"{source.name}-new{share:g}"
    subjects = sorted(p.name for p in source.glob("sub-*"))
    cut = len(subjects) - max(1, round(share * len(subjects)))
    for root, chosen in ((base, subjects[:cut]), (new, subjects[cut:])):
        if root.exists():
            continue
        root.mkdir()
        for f in source.iterdir():
            if f.is_file():
                os.link(f, root / f.name)
        for subject in chosen:
            shutil.copytree(source / subject, root / subject, copy_function=os.link)
    return base, new


def shard_files(corpus: Path) -> list[Path]:
    """A corpus's per-shard files: tars, manifest parts, markers and zarr blocks."""
    return sorted([*(corpus / "shards").iterdir(), *(p for p in (corpus / "timeseries.zarr").rglob("*")
                                                    if p.is_file() and "/c/" in str(p))])


def add_mode(args, runs_root: Path) -> None:
    import hashlib

    source = make_cohort(runs_root, args.scans)
    base_src, new_src = split_cohort(source, args.new_share)
    base = runs_root / f"corpus-base-{args.scans}"
    if not (base / "complete.json").is_file():
        print("building the base corpus (once) ...", flush=True)
        child(["--child", "build", "--source", str(base_src), "--out", str(base), "--workers", "2",
               "--shard-size", str(args.shard_size)])
    runs: dict[str, list[dict]] = {"add": [], "alone": []}
    for round_ in range(args.repeat):
        for name in runs:
            print(f"round {round_ + 1}/{args.repeat}: {name} ...", flush=True)
            out = runs_root / f"corpus-{name}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "alone":
                runs[name].append(child(["--child", "build", "--source", str(new_src), "--out", str(out),
                                         "--workers", "2", "--shard-size", str(args.shard_size)]))
                continue
            shutil.copytree(base, out)
            old = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_files(out)}
            for p in old:
                os.utime(p, (0, p.stat().st_mtime))
            result = child(["--child", "add", "--source", str(new_src), "--out", str(out)])
            read = [p for p in old if p.stat().st_atime > 0]
            written = [p for p, h in old.items() if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != h]
            result |= {"old_files": len(old), "old_bytes": sum(p.stat().st_size for p in old),
                       "read": len(read), "read_bytes": sum(p.stat().st_size for p in read),
                       "written": len(written), "written_bytes": sum(p.stat().st_size for p in written if p.exists())}
            runs[name].append(result)
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    add, alone = best["add"], best["alone"]
    print(f"\nbase corpus: {args.scans - add['scans']} scans; new wave: {add['scans']} scans of new subjects "
          f"({args.new_share:.0%}); shard size {args.shard_size}; {os.cpu_count()} CPUs; best of {args.repeat}")
    print(f"{'run':8s} {'seconds':>8s} {'shards':>7s}   (ray start s)")
    for name, r in best.items():
        print(f"{name:8s} {r['seconds']:8.1f} {r['shards']:7d}   ({r['ray_start']:.1f})")
    print(f"add / alone                {add['seconds'] / alone['seconds']:5.2f}   (target <= 1.20)")
    print(f"base corpus shard files: {add['old_files']} ({add['old_bytes'] / 1e6:.1f} MB); read by the add: "
          f"{add['read']} ({add['read_bytes'] / 1e6:.2f} MB); written: {add['written']} "
          f"({add['written_bytes'] / 1e6:.2f} MB)   (target: 0 and 0)")


# ---- parent -------------------------------------------------------------------------------------------

def make_cohort(root: Path, scans: int) -> Path:
    from corpus_builder.config import SynthConfig
    from corpus_builder.synth import synthesize

    source = root / f"cohort-{scans}"
    if not (source / "synth.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        print(f"writing a {scans}-scan cohort to {source} ...", flush=True)
        t0 = time.perf_counter()
        synthesize(SynthConfig(subjects=scans, datasets=DATASETS), source)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return source


def child(args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1])
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=400, help="scans (one per subject) of the cohort")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="cache for the cohort (default: a temp dir, removed after); corpora go here too")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three runs; the best of each is kept")
    parser.add_argument("--shard-size", type=int, default=64, help="corpus.build.shard_size (the default: 64)")
    parser.add_argument("--add", action="store_true", help="add mode: `corpus add` of a new wave vs building it alone")
    parser.add_argument("--new-share", type=float, default=0.1, help="add mode: share of subjects in the new wave")
    parser.add_argument("--child", choices=["baseline", "build", "add"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "baseline":
        print(json.dumps(run_baseline(args.source, args.workers)))
        return
    if args.child == "build":
        print(json.dumps(run_build(args.source, args.out, args.workers, args.shard_size)))
        return
    if args.child == "add":
        print(json.dumps(run_add(args.source, args.out)))
        return

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fmrilm-bench-build-")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.add:
        add_mode(args, args.workdir)
        if tmp is not None:
            tmp.cleanup()
        return
    source = make_cohort(args.workdir, args.scans)

    runs: dict[str, list[dict]] = {"baseline": [], "build x2": [], "build x1": []}
    for round_ in range(args.repeat):
        for name in runs:
            print(f"round {round_ + 1}/{args.repeat}: {name} ...", flush=True)
            if name == "baseline":
                result = child(["--child", "baseline", "--source", str(source), "--workers", "2"])
            else:
                out = args.workdir / f"corpus-{name[-1]}"
                shutil.rmtree(out, ignore_errors=True)
                result = child(["--child", "build", "--source", str(source), "--out", str(out),
                                "--workers", name[-1], "--shard-size", str(args.shard_size)])
                shutil.rmtree(out, ignore_errors=True)
            runs[name].append(result)
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    rate = {name: r["scans"] / r["seconds"] for name, r in best.items()}

    base, b2, b1 = best["baseline"], best["build x2"], best["build x1"]
    print(f"\ncohort: {base['scans']} scans ({base['ok']} ok), {'+'.join(DATASETS)}, T=160, N=450; "
          f"{b2['shards']} shards of <= {args.shard_size}; {os.cpu_count()} CPUs; best of {args.repeat}")
    print(f"{'run':10s} {'seconds':>8s} {'scans/s':>8s}   (ray start s)")
    for name, r in best.items():
        extra = f"   ({r['ray_start']:.1f})" if "ray_start" in r else ""
        print(f"{name:10s} {r['seconds']:8.1f} {rate[name]:8.2f}{extra}")
    print(f"build x2 / baseline rate   {rate['build x2'] / rate['baseline']:5.2f}   (target >= 0.80)")
    with_start = b2["scans"] / (b2["seconds"] + b2["ray_start"]) / rate["baseline"]
    print(f"  with ray start           {with_start:5.2f}")
    print(f"build x2 / build x1 rate   {rate['build x2'] / rate['build x1']:5.2f}   (target >= 1.70)")
    print("\nwhere the time went (seconds, wall)")
    print(f"{'':26s} {'build x2':>9s} {'build x1':>9s}")
    for phase in b2["phases"]:
        print(f"{phase:26s} {b2['phases'][phase]:9.2f} {b1['phases'][phase]:9.2f}")
    print(f"{'baseline':26s} " + ", ".join(f"{k} {v:.2f}" for k, v in base["phases"].items()))
    print("\nshard tasks per pass: task time / (workers x pass wall) = how busy the workers were;")
    print("task CPU / task wall = the share of a core a task got (< 1: waiting on I/O or on other processes)")
    heads = ("busy x2", "busy x1", "cpu x2", "cpu x1", "task s x2", "task s x1")
    print(f"{'':10s} " + " ".join(f"{h:>9s}" for h in heads))
    for phase in ("extract", "describe", "write"):
        p2, p1 = b2["passes"][phase], b1["passes"][phase]
        busy = [p["task_wall"] / (r["workers"] * max(p["wall"], 1e-9)) for p, r in ((p2, b2), (p1, b1))]
        share = [p["task_cpu"] / max(p["task_wall"], 1e-9) for p in (p2, p1)]
        print(f"{phase:10s} {busy[0]:9.2f} {busy[1]:9.2f} {share[0]:9.2f} {share[1]:9.2f} "
              f"{p2['task_wall']:9.1f} {p1['task_wall']:9.1f}")
    cpu = [sum(r["passes"][p]["task_cpu"] for p in r["passes"]) for r in (b2, b1)]
    print(f"task CPU seconds, all passes: x2 {cpu[0]:.1f}, x1 {cpu[1]:.1f} (same work: {cpu[0] / cpu[1]:.2f}x)")
    # What the same runs would take had every task had a whole core (a shared machine's other processes
    # gone): each pass's wall scaled by its tasks' CPU share, plus the driver's own phases (the faster of
    # the two runs, for both).
    driver = sum(min(b2["phases"][k], b1["phases"][k]) for k in b2["phases"]
                 if k not in ("ray start", "  of which fit_reference") and not k.endswith(" pass"))
    est = [driver + sum(p["wall"] * p["task_cpu"] / max(p["task_wall"], 1e-9) for p in r["passes"].values())
           for r in (b2, b1)]
    print(f"estimate with whole cores per task: x2 {est[0]:.1f} s, x1 {est[1]:.1f} s -> speed-up "
          f"{est[1] / est[0]:.2f} (driver phases {driver:.1f} s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
