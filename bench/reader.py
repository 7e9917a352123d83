"""Benchmark: decoded samples/s through `corpus_builder.readers.torch_dataset` vs reading the same tar bytes raw.

    python bench/reader.py [--workdir DIR] [--scans 400] [--corpus CORPUS] [--split train] [--repeat 3]

Builds (once, reused from --workdir) a corpus of SCANS synthetic scans at the default T = 160, N = 450, or reads
an existing one (--corpus). Then measures, alternating and keeping each one's best of --repeat runs (the page cache
is warm for all of them: the first pass reads every tar once):
    bytes    plain Python reads of each tar file, 1 MiB at a time (the floor of any reader)
    tar      `tarfile` stream iteration reading every member of every sample fully (a raw sequential read),
             through the same 1 MiB file buffer the reader uses
    decoded  `torch_dataset(batch_size=32, shuffle=--shuffle)` in one process: ts.npy -> float32 tensor,
             caption.txt -> str, desc.json -> 23 z-values, collated into batches
and prints samples/s and MB/s of each, and the ratio decoded / tar (target >= 0.5) next to decoded / bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpus_builder.readers import READ_BUFFER, shard_urls, torch_dataset  # noqa: E402


def build(workdir: Path, scans: int) -> Path:
    from corpus_builder.build import build_corpus
    from corpus_builder.synth import synthesize
    from fmrilm.config import load_config

    corpus = workdir / f"corpus-{scans}"
    if (corpus / "summary.json").exists():
        return corpus
    cfg = load_config(None, [f"synth.subjects={scans}"])
    if not (workdir / f"cohort-{scans}" / "participants.tsv").exists():
        print(f"writing a synthetic cohort of {scans} scans ...", flush=True)
        synthesize(cfg.synth, workdir / f"cohort-{scans}")
    print("building the corpus ...", flush=True)
    summary = build_corpus([str(workdir / f"cohort-{scans}")], cfg.corpus, corpus, overwrite=True)
    print(f"built {summary['ok']} scans in {summary['seconds']:.0f} s", flush=True)
    return corpus


def read_bytes(tars: list[str]) -> None:
    for path in tars:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def read_tar(tars: list[str]) -> int:
    samples = 0
    for path in tars:
        with open(path, "rb", buffering=READ_BUFFER) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isreg():
                    tar.extractfile(member).read()
                    samples += member.name.endswith(".ts.npy")
    return samples


def read_decoded(corpus: Path, split: str, batch_size: int, shuffle: int) -> int:
    return sum(len(batch["key"]) for batch in torch_dataset(corpus, split, batch_size=batch_size, shuffle=shuffle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fmrilm-bench-reader")
    parser.add_argument("--scans", type=int, default=400)
    parser.add_argument("--corpus", type=Path, help="an existing corpus (skips the build)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle", type=int, default=0, help="sample shuffle buffer of the decoded path")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or build(args.workdir, args.scans)
    tars = shard_urls(corpus, args.split)
    size = sum(os.path.getsize(t) for t in tars)
    samples = read_tar(tars)  # warms the page cache
    print(f"corpus {corpus}: split {args.split}, {len(tars)} shards, {samples} samples, {size / 1e6:.1f} MB; "
          f"{os.cpu_count()} CPUs (shared machines give noisy numbers: best of {args.repeat})")

    runs = {"bytes": lambda: read_bytes(tars), "tar": lambda: read_tar(tars),
            "decoded": lambda: read_decoded(corpus, args.split, args.batch_size, args.shuffle)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            n = run()
            best[name] = min(best[name], time.perf_counter() - start)
            if n is not None and n != samples:
                raise SystemExit(f"{name}: read {n} samples, expected {samples}")
    for name, seconds in best.items():
        print(f"{name:8s} {seconds:7.3f} s  {samples / seconds:9.1f} samples/s  {size / 1e6 / seconds:8.1f} MB/s")
    ratio = best["tar"] / best["decoded"]
    print(f"decoded / tar read   = {ratio:.2f}  (target >= 0.5: {'ok' if ratio >= 0.5 else 'MISSED'})")
    print(f"decoded / bytes read = {best['bytes'] / best['decoded']:.2f}")


if __name__ == "__main__":
    main()
