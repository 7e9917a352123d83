"""Stage-2 objectives judged downstream: the pipeline's ablations side by side on one corpus, each stage-2 variant
read by its caption fidelity (all claims and the recoverable ones, minus the shuffled-scan control with a paired
95 % interval over val subjects) and by the stage-3 `tuned` sex / ADHD AUC (95 % interval over test subjects, and
its difference from the FC baseline on the same subjects), with F2F accuracy beside its bounds (copy, most frequent
code per ROI, per-ROI bigram), without a bar.

    .venv/bin/python bench/stage2_objectives.py [--config configs/objectives.yaml] [--set key=value ...]
        [--recoverable runs/llm-q4k/recoverable.json]

Runs `fmrilm pipeline` on the config (synth -> corpus -> tokenizer -> align -> instruct -> eval, then every variant of
its `ablations`: F2F off, F2T off, T2T off, a stage-1 tokenizer without the domain loss, the features input mode,
no connectivity tokens); finished stages are skipped, so a rerun only prints. The scale is the config's (stated in
configs/objectives.yaml: about 90 CPU minutes on the 2-core machine for the seven runs). `--recoverable`: the claims
scored apart (bench/caption_recoverability.py's JSON; by default the list measured on the 4000-subject corpus of the
same generator, whose 3200 train scans give the probe more power than this corpus's 320).
Writes `<workdir>/objectives.json` and prints the table.

Each variant's tuned AUC is also given minus the default's, paired over the same test subjects.

Measured 2026-12-07 on the quiet 2-core machine: 85 min for the seven runs; no difference between the objectives at
this scale (30 stage-2 steps do not teach the captions' language; tuned sex AUC at chance beside FC 0.995; ADHD on
20 test scans spreads as much between two draws of the cohort as between variants): docs/results.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fmrilm.config import load_config
from fmrilm.pipeline import run_pipeline


def interval(figures: dict, metric: str) -> str:
    value, ci = figures.get(metric), (figures.get("ci") or {}).get(metric)
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def fidelity(m: dict, claims: str) -> str:
    key = f"caption_fidelity{claims}"
    if key not in m:
        return "-"
    low, high = m.get(f"{key}_minus_shuffled_ci_low"), m.get(f"{key}_minus_shuffled_ci_high")
    return (f"{m[key]:.3f} (shuffled {m[f'{key}_shuffled']:.3f}; diff {m[f'{key}_minus_shuffled']:+.3f} "
            f"[{low:+.2f}, {high:+.2f}])")


def minus_main(workdir: Path, name: str, task: str) -> str:
    """The variant's tuned AUC minus the default's on the same test scans, paired over test subjects."""
    from evaluation.metrics import paired_difference

    root = workdir / "ablations" / name
    mine, main_ = (json.loads((r / "eval" / "predictions.json").read_text()).get(task) for r in (root, workdir))
    if not mine or not main_ or "tuned" not in mine or "tuned" not in main_ or mine["keys"] != main_["keys"]:
        return ""
    diff = paired_difference("classification", mine["y"], mine["tuned"], main_["tuned"], mine["subjects"])["auc"]
    ci = diff["ci"]
    return f"; minus default {diff['diff']:+.3f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def rows(workdir: Path, names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        root = workdir if name == "main" else workdir / "ablations" / name
        align = root / "align" / "metrics.json"
        align = align if align.is_file() else workdir / "align" / "metrics.json"  # a variant that shares main's
        evaluated = json.loads((root / "eval" / "metrics.json").read_text())
        out[name] = {"align": json.loads(align.read_text()), "eval": evaluated}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/objectives.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recoverable", type=Path, default=Path("runs/llm-q4k/recoverable.json"))
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.recoverable.is_file():
        claims = json.loads(args.recoverable.read_text())["recoverable"]
        overrides.append(f"align.eval.claims={json.dumps(claims)}")
    cfg = load_config(args.config, overrides)
    workdir = Path(cfg.workdir)
    run_pipeline(cfg, workdir)
    table = rows(workdir, ["main", *cfg.ablations])

    print(f"\n{cfg.align.steps} stage-2 steps (batch {cfg.align.batch_size}), {cfg.instruct.steps} stage-3 steps, "
          f"eval tuned {cfg.eval.tuned_epochs} epochs; caption fidelity on {cfg.align.eval.caption_scans} val scans, "
          f"AUC on the test split")
    for name, r in table.items():
        a, e = r["align"], r["eval"]
        overrides = "default" if name == "main" else " ".join(cfg.ablations[name])
        print(f"\n{name}: {overrides}")
        print(f"  caption fidelity, all claims    {fidelity(a, '')}")
        print(f"  caption fidelity, recoverable   {fidelity(a, '_recoverable')}")
        if "caption_loss_saved_by_scan" in a:
            print(f"  caption loss saved by the scan {a['caption_loss_saved_by_scan']:+.4f} "
                  f"[{a['caption_loss_saved_by_scan_ci_low']:+.4f}, {a['caption_loss_saved_by_scan_ci_high']:+.4f}]"
                  " nats per caption token (teacher-forced)")
        if "f2f_accuracy" in a:
            print(f"  F2F accuracy {a['f2f_accuracy']:.4f}  (copy {a['f2f_copy_baseline']:.4f}, most frequent "
                  f"{a['f2f_frequent_baseline']:.4f}, bigram {a.get('f2f_bigram_baseline', float('nan')):.4f})")
        for task in ("sex", "adhd"):
            entry = e.get(task, {})
            if "skipped" in entry or "tuned" not in entry:
                print(f"  {task}: {entry.get('skipped', 'not evaluated')}")
                continue
            diff = entry["tuned"].get("vs_fc_baseline", {}).get("auc", {})
            ci = diff.get("ci")
            versus = f"; minus FC {diff['diff']:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
            print(f"  {task} tuned AUC {interval(entry['tuned'], 'auc')}  (FC baseline "
                  f"{interval(entry['fc_baseline'], 'auc')}{versus}"
                  f"{minus_main(workdir, name, task) if name != 'main' else ''})")
    (workdir / "objectives.json").write_text(json.dumps(
        {name: {"overrides": [] if name == "main" else cfg.ablations[name], **r} for name, r in table.items()},
        indent=1))
    print(f"\nwrote {workdir / 'objectives.json'}")


if __name__ == "__main__":
    main()
