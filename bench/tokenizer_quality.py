"""Quality check of stage 1 on a synthetic cohort: the figures the tokenizer issue asks for, for the full loss
and for the contrastive-off ablation (the paper's "w/o descriptors"), trained with the same config and seed.

    .venv/bin/python bench/tokenizer_quality.py [--config configs/tokenizer_quality.yaml] [--corpus CORPUS]
                                                [--set key=value ...] [--runs full contrastive_off]

Without --corpus it synthesises the config's cohort and builds its corpus first (Ray), under the config's
workdir. Each training is a normal `fmrilm tokenizer train` stage, tracked in the workdir's MLflow store.
Targets (on val): reconstruction R^2 clearly above 0, codebook usage >= 25 % of K, domain-classifier accuracy
within 0.5 +- 0.1, retrieval R@5 >= 3x chance. About 40 min per training on a 2-core CPU with the shipped
config, 1000 steps (plus about 14 min to synthesise and build the 2400-scan corpus). The two trainings are independent:
`--runs full` and `--runs contrastive_off` may run at the same time on one workdir, and `--runs` with no name
prints the table of what the workdir holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fmrilm.config import load_config
from fmrilm.stage import run_stage
from fmrilm.stages import REGISTRY, run_corpus_build, run_synth
from fmrilm.tracking import tracker_for

TARGETS = {
    "reconstruction_r2": ("> 0.1", lambda m: m["reconstruction_r2"] > 0.1),
    "codebook_usage": (">= 0.25", lambda m: m["codebook_usage"] >= 0.25),
    "domain_accuracy": ("0.5 +- 0.1", lambda m: abs(m["domain_accuracy"] - 0.5) <= 0.1),
    # a fresh linear probe, fitted on held-out latents: what "indistinguishable" means when the adversary lags
    "domain_probe_accuracy": ("0.5 +- 0.1", lambda m: abs(m["domain_probe_accuracy"] - 0.5) <= 0.1),
    # the same with a two-layer MLP trained to convergence: also sees gaps beyond the first two moments
    "domain_mlp_probe_accuracy": ("0.5 +- 0.1", lambda m: abs(m["domain_mlp_probe_accuracy"] - 0.5) <= 0.1),
    "retrieval_r5": (">= 3x chance", lambda m: m["retrieval_r5"] >= 3 * m["retrieval_chance_r5"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tokenizer_quality.yaml"))
    parser.add_argument("--corpus", type=Path, help="an existing corpus (default: synthesise and build one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", nargs="*", choices=["full", "contrastive_off"], default=["full", "contrastive_off"],
                        help="which trainings to run (none: only print the table); the table also shows earlier "
                             "results found in the workdir")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    workdir = Path(cfg.workdir)
    tracker = tracker_for(cfg, workdir)
    corpus = args.corpus or workdir / "corpus"
    if args.corpus is None and args.runs and not (corpus / "summary.json").is_file():
        source = run_synth(cfg, workdir / "source", tracker)
        run_corpus_build(cfg, [str(source.out)], corpus, tracker, input_run_id=source.run_id)

    results = {}
    for name, contrastive in (("full", cfg.tokenizer.loss.contrastive), ("contrastive_off", 0.0)):
        out = workdir / f"tokenizer-{name}"
        if name in args.runs:
            if out.exists():
                raise SystemExit(f"{out} exists: remove it to train again (a rerun would resume the finished run)")
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.tokenizer.loss.contrastive = contrastive
            result = run_stage(REGISTRY["tokenizer"], run_cfg, out, tracker, {"corpus": corpus})
            print(f"{name}: {json.dumps(result.summary)}  (MLflow run {result.run_id})", flush=True)
        if (out / "metrics.json").is_file():
            results[name] = json.loads((out / "metrics.json").read_text())

    if not results:
        raise SystemExit(f"no finished training in {workdir}: run with --runs full contrastive_off")
    first = next(iter(results.values()))
    print(f"\ncorpus {corpus}; {cfg.tokenizer.steps} steps, batch {cfg.tokenizer.batch_size}, "
          f"K {cfg.tokenizer.model.codebook_size}; val scans {int(first['scans'])}, "
          f"chance R@5 {first['retrieval_chance_r5']:.3f}")
    print(f"{'figure':<27}{'target':<16}" + "".join(f"{name:>18}" for name in results))
    for key, (target, ok) in TARGETS.items():
        cells = "".join(f"{m[key]:>12.3f} {'ok ' if ok(m) else 'NO ':>5}" if key in m else f"{'-':>18}"
                        for m in results.values())
        print(f"{key:<27}{target:<16}{cells}")
    if "contrastive_off" in results:
        print("(the targets are the full loss's; the ablation shows what the captions add: without SigLIP the "
              "scan head is untrained and retrieval sits at chance)")
    (workdir / "quality.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
