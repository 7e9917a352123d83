"""Benchmark: parcellating a UKB-sized 4D NIfTI with the streamed sparse extraction vs loading / nilearn.

    python bench/extract.py [--workdir DIR] [--volumes 490] [--repeat 1]

Writes (once, reused from --workdir) a gzipped float32 image of 88x88x64 x VOLUMES (UKB's rfMRI grid and
length) with brain-like content, and a 450-ROI synthetic atlas on that grid (a 50-label "Tian" image and a
400-label "Schaefer" image, plus the same labels as one image for nilearn). Then it measures, each step in
its own subprocess so that its peak RSS is its own (VmHWM of the child):
    load    nibabel `get_fdata(dtype=float32)` of the image (the floor: decompress + convert)
    masker  nilearn `NiftiLabelsMasker(strategy="mean").fit_transform`
    ours    `corpus_builder.nifti.extract` (sparse label matrix, streamed over volumes)
and prints the ratios side by side: ours / load time (target <= 1.5), ours peak RSS / image float32 size
(target <= 2), and ours vs the masker (time and memory), plus the largest difference between ours and the
masker's output.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (88, 88, 64)
TR = 0.735
N_SUB, N_CORTEX = 50, 400


def _affine() -> np.ndarray:
    affine = np.diag([2.4, 2.4, 2.4, 1.0])
    affine[:3, 3] = -np.array(SHAPE) * 2.4 / 2
    return affine


def _brain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid brain mask and its subcortical core."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    r = np.sqrt((grid ** 2 / np.array([0.85, 0.9, 0.8])[:, None, None, None] ** 2).sum(0))
    return r < 1.0, r < 0.35


def write_atlas(workdir: Path, rng: np.random.Generator) -> None:
    """Voronoi parcels of random seeds: 50 in the core ("Tian"), 400 in the shell ("Schaefer")."""
    import nibabel as nib
    from scipy.spatial import cKDTree

    brain, core = _brain(rng)
    labels = np.zeros(SHAPE, np.int16)
    for mask, n, offset in ((core, N_SUB, 0), (brain & ~core, N_CORTEX, N_SUB)):
        coords = np.argwhere(mask)
        seeds = coords[rng.choice(len(coords), n, replace=False)]
        labels[tuple(coords.T)] = cKDTree(seeds).query(coords)[1] + 1 + offset
    affine = _affine()
    nib.save(nib.Nifti1Image(labels, affine), workdir / "atlas-all_dseg.nii.gz")
    tian = np.where((labels > 0) & (labels <= N_SUB), labels, 0).astype(np.int16)
    schaefer = np.where(labels > N_SUB, labels - N_SUB, 0).astype(np.int16)
    nib.save(nib.Nifti1Image(tian, affine), workdir / "atlas-tian_dseg.nii.gz")
    nib.save(nib.Nifti1Image(schaefer, affine), workdir / "atlas-schaefer_dseg.nii.gz")


def write_image(path: Path, volumes: int, rng: np.random.Generator) -> None:
    """Stream the image to disk a volume at a time (the generator never holds the 4D array)."""
    import nibabel as nib

    brain, _ = _brain(rng)
    base = np.where(brain, 1000.0 + 200 * rng.random(SHAPE), 0).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape((*SHAPE, volumes))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    header.set_zooms((2.4, 2.4, 2.4, TR))
    header.set_xyzt_units("mm", "sec")
    header.set_qform(_affine(), 1)
    header.set_sform(_affine(), 1)
    tmp = path.with_name(path.name + ".part")
    with gzip.open(tmp, "wb", compresslevel=1) as f:   # nibabel's own default level
        header.write_to(f)
        f.write(b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr))
        slow = rng.standard_normal(volumes).cumsum() * 0.5
        for t in range(volumes):
            vol = base * (1 + 0.01 * slow[t]) + np.where(brain, rng.normal(0, 10, SHAPE), 0)
            f.write(np.asarray(vol, np.float32).tobytes(order="F"))
    tmp.rename(path)


def run_step(step: str, workdir: Path, image: Path) -> dict:
    """Child process body: run one step, report its time and peak RSS.

    Imports are done before the clock starts; `setup` is the once-per-process part (reading the atlas:
    building the sparse matrix, or the masker's `fit`), `seconds` the per-scan part.
    """
    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker

    from corpus_builder.nifti import LabelAtlas, extract

    baseline = _vm("VmRSS")
    t0 = time.perf_counter()
    result = None
    if step == "load":
        t1 = time.perf_counter()
        out = nib.load(image).get_fdata(dtype=np.float32)
    elif step == "masker":
        masker = NiftiLabelsMasker(labels_img=str(workdir / "atlas-all_dseg.nii.gz"), strategy="mean",
                                   standardize=None).fit()
        t1 = time.perf_counter()
        result = out = masker.transform(str(image))
    else:
        atlas = LabelAtlas.from_images([workdir / "atlas-tian_dseg.nii.gz",
                                        workdir / "atlas-schaefer_dseg.nii.gz"])
        t1 = time.perf_counter()
        result = out = extract(image, atlas)[0]
    seconds = time.perf_counter() - t1
    if result is not None:
        np.save(workdir / f"result-{step}.npy", result)
    del out
    return {"seconds": seconds, "setup": t1 - t0, "peak_rss": _vm("VmHWM"), "baseline_rss": baseline}


def _vm(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS now, VmHWM = peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="cache for the generated image and atlas (default: a temp dir, removed after)")
    parser.add_argument("--volumes", type=int, default=490, help="volumes of the image (490 = UKB)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the best time is kept")
    parser.add_argument("--step", choices=["load", "masker", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fmrilm-bench-")
        args.workdir = Path(tmp.name)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / f"bold_{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}x{args.volumes}.nii.gz"
    if args.step:
        print(json.dumps(run_step(args.step, workdir, image)))
        return

    rng = np.random.default_rng(0)
    if not (workdir / "atlas-all_dseg.nii.gz").exists():
        write_atlas(workdir, rng)
    if not image.exists():
        print(f"writing {image} ...", flush=True)
        t0 = time.perf_counter()
        write_image(image, args.volumes, rng)
        size = image.stat().st_size / 2**20
        print(f"  {size:.0f} MiB gzipped in {time.perf_counter() - t0:.0f} s", flush=True)

    results = {}
    for step in ("load", "masker", "ours"):
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--workdir", str(workdir), "--volumes", str(args.volumes),
                   "--step", step]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        results[step] = min(runs, key=lambda r: r["seconds"]) | {"peak_rss": max(r["peak_rss"] for r in runs)}

    image_bytes = 4 * int(np.prod(SHAPE)) * args.volumes
    ours, load, masker = results["ours"], results["load"], results["masker"]
    diff = np.abs(np.load(workdir / "result-ours.npy") - np.load(workdir / "result-masker.npy")).max()
    mib = 2**20
    print(f"image {SHAPE} x {args.volumes} float32 = {image_bytes / mib:.0f} MiB "
          f"({image.stat().st_size / mib:.0f} MiB gzipped); atlas {N_SUB} + {N_CORTEX} ROIs")
    print(f"{'step':8s} {'time s':>8s} {'setup s':>8s} {'peak RSS MiB':>13s} {'after imports MiB':>18s}")
    for name, r in results.items():
        print(f"{name:8s} {r['seconds']:8.2f} {r['setup']:8.2f} {r['peak_rss'] / mib:13.0f} "
              f"{r['baseline_rss'] / mib:18.0f}")
    print(f"ours / load time            {ours['seconds'] / load['seconds']:6.2f}x   (target <= 1.5)")
    print(f"ours peak RSS / image size  {ours['peak_rss'] / image_bytes:6.2f}x   (target <= 2)")
    print(f"  without the imports       {(ours['peak_rss'] - ours['baseline_rss']) / image_bytes:6.2f}x")
    print(f"load peak RSS / image size  {load['peak_rss'] / image_bytes:6.2f}x")
    print(f"masker peak RSS / image size{masker['peak_rss'] / image_bytes:6.2f}x")
    print(f"ours / masker time          {ours['seconds'] / masker['seconds']:6.2f}x")
    print(f"ours / masker peak RSS      {ours['peak_rss'] / masker['peak_rss']:6.2f}x")
    print(f"max |ours - masker|         {diff:.2e}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
