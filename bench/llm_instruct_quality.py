"""Quality check of stage 3 on a synthetic cohort with planted effects, SmolLM2-135M: the figures the stage-3 issue
asks for, on the stage-2 model of `bench/llm_align_quality.py` (its `tokens` run).

    .venv/bin/python bench/llm_instruct_quality.py [--config configs/llm_quality.yaml] [--set key=value ...]

Runs (finished steps are reused; all tracked in the config's MLflow store):
  1. stage 3: instruction tuning of WORKDIR/align-tokens on the corpus's qa.json items (config `instruct`; the
     shipped bench config leaves diagnosis out of the mix, so ADHD is zero-shot in the paper's sense) -> instruct-tokens
  2. eval of the stage-3 folder (config `eval`: zero-shot, k-shot in context, train_n few-shot fine-tuning)
     -> eval-instruct; its `zero_shot` on sex is the multi-task tuned figure
  3. eval of the stage-2 folder with `tuned` only (fine-tuned on every train scan of one task: single-task, the
     config's `eval.finetune_steps`) -> eval-single
  4. per task, eval of the stage-3 folder with `tuned` only, fine-tuned `--tuned-steps` steps on every train scan
     of that task (the paper's tuned protocol: the instruction-tuned model tuned on the task) ->
     eval-tuned<steps>-<task>
`--skip-tuned` runs 1 and 2 only. Prints the table (AUC with its 95 % bootstrap interval over test subjects) and the
verdicts: the tuned model's (4) sex and diagnosis AUC >= the FC baseline's - 0.05; 2-shot
fine-tuning above zero-shot (on the task left out of the mix); multi-task within 0.03 AUC of single-task.
`bench/stage3_ceiling.py` says how far the tokens themselves can go.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fmrilm.config import load_config
from fmrilm.stage import run_stage
from fmrilm.stages import REGISTRY, run_eval
from fmrilm.tracking import tracker_for


def auc(metrics: dict, task: str, protocol: str) -> float | None:
    figures = metrics.get(task, {}).get(protocol)
    return figures.get("auc") if isinstance(figures, dict) else None


def auc_cell(metrics: dict, task: str, protocol: str) -> str:
    """'0.512 [0.40,0.63]': the AUC with its 95 % bootstrap interval over test subjects."""
    value = auc(metrics, task, protocol)
    if value is None:
        return "-"
    ci = (metrics[task][protocol].get("ci") or {}).get("auc")
    return f"{value:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/llm_quality.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tuned-steps", type=int, default=200, help="fine-tuning steps of the tuned protocol (4)")
    parser.add_argument("--skip-tuned", action="store_true", help="runs 1 and 2 only (stage 3 and its evaluation)")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    workdir = Path(cfg.workdir)
    tracker = tracker_for(cfg, workdir)
    corpus, aligned = workdir / "corpus", workdir / "align-tokens"
    if not (aligned / "brain.json").is_file():
        raise SystemExit(f"{aligned}: no stage-2 model; run bench/llm_align_quality.py --runs tokens first")
    tuned3 = workdir / "instruct-tokens"
    if not (tuned3 / "brain.json").is_file():
        result = run_stage(REGISTRY["instruct"], cfg, tuned3, tracker, {"model": aligned, "corpus": corpus})
        print(f"instruct: {json.dumps(result.summary)}  (MLflow run {result.run_id})", flush=True)
    evaluated = {}
    single = cfg.model_copy(deep=True)
    single.eval = cfg.eval.model_copy(update={"shots": [0], "train_n": [], "tuned": True, "examples": 0})
    runs = [("eval-instruct", tuned3, cfg)] + ([] if args.skip_tuned else [("eval-single", aligned, single)])
    for name, model, run_cfg in runs:
        out = workdir / name
        if not (out / "metrics.json").is_file():
            result = run_eval(run_cfg, model, corpus, out, tracker)
            print(f"{name}: MLflow run {result.run_id}", flush=True)
        evaluated[name] = json.loads((out / "metrics.json").read_text())
    tuned_m: dict = {}  # task -> its metrics from run 4
    for task in [] if args.skip_tuned else cfg.eval.tasks or []:
        out = workdir / f"eval-tuned{args.tuned_steps}-{task}"
        if not (out / "metrics.json").is_file():
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.eval = cfg.eval.model_copy(update={"tasks": [task], "shots": [0], "train_n": [], "tuned": True,
                                                       "finetune_steps": args.tuned_steps, "examples": 0})
            result = run_eval(run_cfg, tuned3, corpus, out, tracker)
            print(f"{out.name}: MLflow run {result.run_id}", flush=True)
        tuned_m |= json.loads((out / "metrics.json").read_text())

    multi, single_m = evaluated["eval-instruct"], evaluated.get("eval-single", {})
    print(f"\ncorpus {corpus}; stage 2 {aligned}; stage 3 {tuned3} (left out of its mix: "
          f"{cfg.instruct.exclude_attributes or 'nothing'}); test split, AUC")
    rows = [("zero_shot (stage 3)", multi, "zero_shot"), ("k_shot_2 (stage 3)", multi, "k_shot_2"),
            *[(f"train_n_{n} (stage 3)", multi, f"train_n_{n}") for n in cfg.eval.train_n],
            ("tuned, single-task (stage 2)", single_m, "tuned"),
            (f"tuned (stage 3, {args.tuned_steps} steps)", tuned_m, "tuned"), ("fc_baseline", multi, "fc_baseline"),
            ("tokenizer_probe", multi, "tokenizer_probe")]
    tasks = [t for t, e in multi.items() if "skipped" not in e and e["kind"] == "classification"]
    print(f"{'protocol':<32}" + "".join(f"{t:>22}" for t in tasks))
    for label, metrics, protocol in rows:
        print(f"{label:<32}" + "".join(f"{auc_cell(metrics, t, protocol):>22}" for t in tasks))
    for task in tasks:
        fc, tuned = auc(multi, task, "fc_baseline"), auc(single_m, task, "tuned")
        in_mix = multi[task].get("in_tuning_mix")
        best = auc(tuned_m, task, "tuned")
        if best is not None:
            print(f"{task}: tuned {best:.3f} vs FC - 0.05 = {fc - 0.05:.3f}: {'yes' if best >= fc - 0.05 else 'NO'}")
        print(f"{task}: in the tuning mix (from the items trained on): {in_mix}")
        for n in cfg.eval.train_n:
            few, zero = auc(multi, task, f"train_n_{n}"), auc(multi, task, "zero_shot")
            kind = "in the tuning mix" if in_mix else "left out of the mix: true zero-shot"
            print(f"{task} ({kind}): train_n_{n} {few:.3f} vs zero-shot {zero:.3f}: {'yes' if few > zero else 'NO'}")
        if in_mix and tuned is not None:
            gap = auc(multi, task, "zero_shot") - tuned
            print(f"{task}: multi-task {auc(multi, task, 'zero_shot'):.3f} - single-task {tuned:.3f} = {gap:+.3f}: "
                  f"{'yes' if gap >= -0.03 else 'NO'} (>= -0.03)")


if __name__ == "__main__":
    main()
