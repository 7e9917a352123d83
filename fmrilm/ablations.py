"""Ablations (config `ablations`): named variants of the config whose model stages (those the registry declares
`variant`: tokenizer, align, instruct, eval) run on the main pipeline's corpus into `<workdir>/ablations/<name>/`,
reported beside the main model, through the same runner as the main stages (`fmrilm.runner`).

    ablations:
      no_descriptors: [tokenizer.loss.contrastive=0, align.objectives.f2t=0]   # the paper's "w/o descriptors"
      full_finetuning: [align.lora.enabled=false, instruct.lora.enabled=false]   # LoRA vs full
      stage2_half_data: [align.train_subjects=0.5]                                # the share of stage-2 data

Each override is a `--set` item. A variant's stage whose config and inputs equal the main pipeline's is not trained
again (the main output is its output: `full_finetuning` above reuses the main tokenizer); its other stages skip and
resume like the main ones. Writes `<workdir>/ablations.json` (per variant and for `main`: its overrides and the
headline figure of every task x protocol, AUC for a classification and MAE for a regression, baselines included),
adds an "Ablations" table to the main eval report, and logs the figures to the parent MLflow run as
`ablation/<variant>/<task>/<protocol>/<metric>`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError

from fmrilm.config import ConfigError, PipelineConfig, apply_overrides
from fmrilm.runner import PipelineResult, StageRunner, run_stages, stage_names
from fmrilm.stage import Registry
from fmrilm.tracking import StageRun, Tracker

HEADLINE = {"classification": "auc", "regression": "mae"}


def variant_config(cfg: PipelineConfig, name: str, overrides: list[str]) -> PipelineConfig:
    """The main config with a variant's overrides; one-line ConfigError naming the variant when they do not hold.
    What the main config left unset stays unset (a size read from the corpus stays read from it)."""
    data = cfg.model_dump(mode="json", exclude_unset=True) | {"ablations": {}}
    try:
        return PipelineConfig.model_validate(apply_overrides(data, list(overrides)))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"ablations.{name}: {key}: {problem}") from None
    except ConfigError as err:
        raise ConfigError(f"ablations.{name}: {err}") from None


def headline(metrics: dict) -> dict[str, dict[str, float]]:
    """task -> protocol -> its headline figure (AUC / MAE), baselines included; skipped tasks left out."""
    out: dict[str, dict[str, float]] = {}
    for task, entry in metrics.items():
        if "skipped" in entry:
            continue
        metric = HEADLINE[entry["kind"]]
        out[task] = {protocol: float(figures[metric]) for protocol, figures in entry.items()
                     if isinstance(figures, dict) and metric in figures}
    return out


def ablation_table(summary: dict) -> str:
    """The terminal table: one line per task x protocol, one column per variant (`main` first)."""
    from evaluation.report import ablation_rows

    lines = [f"{'task':<20}{'protocol':<18}{'metric':<7}" + "".join(f"{n[:18]:>20}" for n in summary)]
    for task, protocol, metric, values in ablation_rows(summary):
        cells = "".join(f"{'':>20}" if v is None else f"{v:>20.3f}" for v in values)
        lines.append(f"{task:<20}{protocol:<18}{metric:<7}" + cells)
    return "\n".join(lines)


def run_ablations(cfg: PipelineConfig, workdir: Path, main: dict[str, dict], result: PipelineResult,
                  tracker: Tracker, parent: StageRun, registry: Registry) -> dict:
    """Every variant of `cfg.ablations` through the registry's variant stages, on the main pipeline's other
    outputs (`main`: its records; see the module doc); returns the summary written to `<workdir>/ablations.json`."""
    variants = {name: variant_config(cfg, name, overrides) for name, overrides in cfg.ablations.items()}
    stages = [stage for stage in registry if stage.variant]
    evaluated = {"main": (main["eval"]["output"], [])}
    for name, variant in variants.items():
        modes = dict.fromkeys(stage_names(variant, registry), "auto")
        runner = StageRunner(tracker, parent, result, modes, prefix=f"{name}/")
        given = {stage: record for stage, record in main.items() if not registry[stage].variant}
        records, _ = run_stages(runner, stages, variant, workdir / "ablations" / name, given, shared=main)
        evaluated[name] = (records["eval"]["output"], list(cfg.ablations[name]))
    summary = {}
    for name, (folder, overrides) in evaluated.items():
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
        summary[name] = {"overrides": overrides, "eval": str(folder), "figures": headline(metrics),
                         "metrics": {t: HEADLINE[e["kind"]] for t, e in metrics.items() if "skipped" not in e}}
    (Path(workdir) / "ablations.json").write_text(json.dumps(summary, indent=1))
    parent.log_metrics({f"ablation/{name}/{task}/{protocol}/{summary[name]['metrics'][task]}": value
                        for name in summary for task, protocols in summary[name]["figures"].items()
                        for protocol, value in protocols.items() if math.isfinite(value)})
    parent.log_artifact(Path(workdir) / "ablations.json")
    _add_to_report(Path(main["eval"]["output"]), summary)
    return summary


def _add_to_report(eval_dir: Path, summary: dict) -> None:
    """Re-render the main eval report with the ablation table (from the files the eval stage wrote)."""
    from evaluation.report import write_report

    info = json.loads((eval_dir / "eval.json").read_text())
    write_report(eval_dir / "report.html", json.loads((eval_dir / "metrics.json").read_text()),
                 json.loads((eval_dir / "predictions.json").read_text()), info.pop("descriptions", []),
                 info | {"ablations": summary})
