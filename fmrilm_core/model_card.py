"""The `README.md` model card of every saved model folder (docs/design.md), in the Hugging Face model-card form.

YAML front matter (`base_model`, `library_name`, `license` + `license_name`, `pipeline_tag`, `tags`) that a stock
`huggingface_hub.ModelCard.load(folder / "README.md")` parses, then the sections a reader needs before using the
model: what it is and how to load it, the data lineage, the training config, the measured figures beside the
baselines with their intervals, intended use, limits.

Two writers: `write_model_card` writes the whole card when a stage saves its folder; `add_figures` later replaces
the figures section, and only it, with what `fmrilm eval` measured. The section sits between two HTML comments
(invisible on the Hub) so the rest of the card stays byte-identical however often it is replaced.

Privacy: the card prints counts and fingerprints, never a subject. A lineage's `trained_subjects` list is counted,
not printed, and any of its pseudonyms that reaches the text anyway (a config value, a title) is redacted.

peft's `save_pretrained` writes its own README.md (library_name "peft", its tags): write the card after the
weights. Only PyYAML is imported, so this module stays cheap.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fmrilm_core.errors import InputError
from fmrilm_core.lineage import chain

CARD = "README.md"
FIGURES_START = "<!-- fmrilm:figures:start -->"
FIGURES_END = "<!-- fmrilm:figures:end -->"
FIGURES_HEADING = "## Figures"
SYNTHETIC_WARNING = "**Trained on a synthetic cohort: its figures say nothing about real brains.**"
NOT_EVALUATED = "Not evaluated yet."
# the lab sets the licence: the data-use agreements of its cohorts decide what it may be
LICENSE = "other"
LICENSE_NAME = "set-by-the-lab"
BASE_TAGS = ("fmri", "neuroimaging", "fmri-lm")
SYNTHETIC_TAG = "synthetic-data"
REDACTED = "[subject]"
_LLM_DEFAULTS = ("transformers", "text-generation")  # the signature's defaults, which fit the LLM folders


@dataclass(frozen=True)
class _Kind:
    tag: str
    stage: str
    format: str
    intended_use: str


_KINDS = {
    "tokenizer": _Kind(
        "stage-1-tokenizer", "stage 1 of fMRI-LM: the brain tokenizer",
        "`config.json` + `model.safetensors` (fMRI-LM brain-tokenizer format, version 1): it turns an ROI time "
        "series [T, N] into discrete codes [T/P, N] and back, with a codebook in the target LLM's embedding space.",
        "Turning ROI time series of the atlas it was trained on into brain tokens for stage 2, or its codes and "
        "latents into features for probing. It expects the corpus's preprocessing: ROI order of the atlas, TR "
        "2.0 s, T volumes, per-ROI z-scoring."),
    "align": _Kind(
        "stage-2-align", "stage 2 of fMRI-LM: a causal LLM aligned to brain tokens",
        "a Hugging Face causal-LM folder (full weights or a PEFT LoRA adapter) whose tokenizer holds the "
        "`<|brain_k|>` tokens, the scan markers and a chat template; `brain.json` names the brain tokenizer (copied "
        "into `brain_tokenizer/`), N, W and the layout, so the folder stands alone.",
        "Starting point of stage-3 instruction tuning, and research on how a language model represents resting-state "
        "fMRI tokens (captions, forecasting of the next brain step)."),
    "instruct": _Kind(
        "stage-3-instruct", "stage 3 of fMRI-LM: the instruction-tuned brain-language model",
        "a Hugging Face causal-LM folder (full weights or a PEFT LoRA adapter) whose tokenizer holds the "
        "`<|brain_k|>` tokens, the scan markers and a chat template; `brain.json` names the brain tokenizer (copied "
        "into `brain_tokenizer/`), N, W and the layout, so the folder stands alone.",
        "Answering questions about one resting-state scan (`fmrilm ask`) and the zero-/few-shot evaluation of "
        "`fmrilm eval`, on scans preprocessed like its corpus, for research."),
    "fine_tune": _Kind(
        "fine-tuned", "an fMRI-LM model fine-tuned on one evaluation task (the `tuned` protocol of `fmrilm eval`)",
        "a Hugging Face causal-LM folder (full weights or a PEFT LoRA adapter) whose tokenizer holds the "
        "`<|brain_k|>` tokens, the scan markers and a chat template; `brain.json` names the brain tokenizer (copied "
        "into `brain_tokenizer/`), N, W and the layout, so the folder stands alone.",
        "Measuring how far task-specific fine-tuning takes the stage-3 model on the one task it was tuned on, "
        "against the baselines computed on the same subjects and splits. Not a general-purpose model."),
}


def write_model_card(folder: str | Path, *, kind: str, title: str, summary: str, lineage: dict | None,
                     config: dict, base_model: str | None = None, library_name: str = "transformers",
                     pipeline_tag: str = "text-generation", figures: list[dict] | None = None,
                     extra_tags: Iterable[str] = ()) -> Path:
    """Write `folder/README.md` (atomically) and return its path.

    `kind`: "tokenizer", "align", "instruct" or "fine_tune". `lineage`: the folder's lineage.json content
    ({"stage", "corpus": {"splits_sha256", "pseudonym_scheme", "norms_sha256", "scans", "datasets", "synthetic",
    ...}, "trained_subjects", "parent"}; missing keys print as "not recorded"), None when none was recorded.
    `config`: the stage's config as a JSON-able dict. `figures`: rows as in `add_figures` (None: "not evaluated
    yet"). For kind "tokenizer", `library_name` and `pipeline_tag` left at their defaults become "fmri-lm" and
    "feature-extraction": transformers cannot load a brain tokenizer.
    """
    if kind not in _KINDS:
        raise ValueError(f"model card kind {kind!r}: expected one of {sorted(_KINDS)}")
    folder = Path(folder)
    if kind == "tokenizer" and (library_name, pipeline_tag) == _LLM_DEFAULTS:
        library_name, pipeline_tag = "fmri-lm", "feature-extraction"
    chain = _lineage_chain(lineage)
    synthetic = any(stage["corpus"].get("synthetic") is True for stage in chain)
    tags = list(dict.fromkeys([*BASE_TAGS, _KINDS[kind].tag, *([SYNTHETIC_TAG] if synthetic else []),
                               *extra_tags]))
    front = {**({"base_model": base_model} if base_model else {}), "library_name": library_name,
             "license": LICENSE, "license_name": LICENSE_NAME, "pipeline_tag": pipeline_tag, "tags": tags}
    text = "\n".join([
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000).rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        summary.strip(),
        "",
        *([f"> {SYNTHETIC_WARNING}", ""] if synthetic else []),
        "## What it is",
        "",
        *_what_it_is(folder, kind, base_model),
        "## Data lineage",
        "",
        *_lineage_section(chain),
        "## Training config",
        "",
        "```yaml",
        _config_yaml(config),
        "```",
        "",
        FIGURES_HEADING,
        "",
        _figures_block(figures, None),
        "",
        "## Intended use",
        "",
        _KINDS[kind].intended_use,
        "",
        "## Limits",
        "",
        *_limits(synthetic, generates_text=kind != "tokenizer"),
    ])
    return _write(folder / CARD, _redact(text, chain))


def add_figures(folder: str | Path, figures: list[dict], source: str) -> Path:
    """Replace the figures section of `folder/README.md` with a table of `figures` (from `source`, e.g. the eval
    folder and its protocols); every other byte of the card stays as it was. A card without the section (written by
    hand or by another tool) gets it appended. No card at all is an InputError.

    A figure row: {"task", "protocol", "metric", "value", "ci": [lo, hi], "n"}, optionally "baseline",
    "baseline_value", "baseline_ci", "diff" (model minus baseline) and "diff_ci".
    """
    path = Path(folder) / CARD
    if not path.is_file():
        raise InputError(f"{path}: no model card to add figures to (write_model_card writes it with the model)")
    text = path.read_text(encoding="utf-8")
    block = _figures_block(figures, source)
    start, end = text.find(FIGURES_START), text.find(FIGURES_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(FIGURES_END):]
    else:
        text = text.rstrip("\n") + f"\n\n{FIGURES_HEADING}\n\n{block}\n"
    return _write(path, text)


def _write(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: a reader never sees half a card."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)
    return path


def _lineage_chain(lineage: dict | None) -> list[dict]:
    """This model's lineage, then its input model's, and so on: [{"stage", "corpus", "subjects", "n_subjects"}].
    Missing keys become empty values; the subjects are kept only to count and redact them."""
    return [{"stage": node.get("stage"),
             "corpus": node.get("corpus") if isinstance(node.get("corpus"), dict) else {},
             "subjects": [str(s) for s in node.get("trained_subjects") or []]} for node in chain(lineage)]


def _what_it_is(folder: Path, kind: str, base_model: str | None) -> list[str]:
    k = _KINDS[kind]
    lines = [f"- Stage: {k.stage}.", f"- Format: {k.format}"]
    if base_model:
        lines.append(f"- Base model: `{base_model}`.")
    lines += ["", "Load it with stock libraries:", "", "```python", *_load_snippet(folder, kind), "```", ""]
    return lines


def _load_snippet(folder: Path, kind: str) -> list[str]:
    """How to load this folder; for an LLM folder the files present decide between full weights and LoRA (both
    shown while the weights are not there yet)."""
    if kind == "tokenizer":
        return ['folder = "path/to/this/folder"',
                "# the raw weights and their config, with safetensors alone",
                "import json",
                "from safetensors.torch import load_file",
                "state = load_file(f\"{folder}/model.safetensors\")",
                "config = json.load(open(f\"{folder}/config.json\"))[\"config\"]",
                "# the model itself needs only the fmri-lm package's tokenizer_train",
                "from tokenizer_train.model import BrainTokenizer",
                "tokenizer = BrainTokenizer.from_pretrained(folder)",
                "codes = tokenizer.encode(roi_timeseries)  # [T, N] float -> [T/P, N] ints in [0, K)"]
    lora = (folder / "adapter_config.json").is_file()
    full = (folder / "config.json").is_file() and not lora
    lines = ['folder = "path/to/this/folder"',
             "from transformers import AutoTokenizer",
             "tokenizer = AutoTokenizer.from_pretrained(folder)  # brain tokens, scan markers, chat template"]
    if full or not lora:
        lines += ["from transformers import AutoModelForCausalLM"
                  + ("" if full else "  # full weights (config.json + model.safetensors)"),
                  "model = AutoModelForCausalLM.from_pretrained(folder)"]
    if lora or not full:
        lines += ["from peft import AutoPeftModelForCausalLM"
                  + ("" if lora else "  # or a LoRA adapter (adapter_config.json)"),
                  "model = AutoPeftModelForCausalLM.from_pretrained(folder)"]
    lines += ["# with its brain tokenizer and brain.json, ready for scans: the fmri-lm package",
              "from llm_train.export import load_aligned",
              "model, tokenizer, brain_tokenizer, meta = load_aligned(folder)"]
    return lines


def _lineage_section(chain: list[dict]) -> list[str]:
    if not chain:
        return ["No lineage recorded: the corpus this model was trained on is unknown.", ""]
    own = chain[0]
    corpus = own["corpus"]
    lines = [f"- Corpus fingerprint (key → split assignment, sha256): {_code(corpus.get('splits_sha256'))}",
             f"- Pseudonym scheme fingerprint: {_code(corpus.get('pseudonym_scheme'))} (the secret is never stored)",
             f"- Descriptor norms (sha256): {_code(corpus.get('norms_sha256'))}",
             f"- Corpus path at training time: {_code(corpus.get('path'))}",
             f"- Synthetic cohort: {_yes_no(corpus.get('synthetic'))}",
             f"- Subjects trained on: {len(own['subjects'])} (pseudonymous; the list stays in lineage.json)", ""]
    datasets = corpus.get("datasets") or {}
    lines += ["| Source dataset | Scans |", "| --- | ---: |"]
    lines += [f"| {_cell(name)} | {_cell(count)} |" for name, count in datasets.items()] or ["| not recorded | |"]
    lines.append("")
    scans = corpus.get("scans") or {}
    lines += ["| Split | Scans |", "| --- | ---: |"]
    lines += [f"| {_cell(split)} | {_cell(count)} |" for split, count in scans.items()] or ["| not recorded | |"]
    lines.append("")
    if len(chain) == 1:
        lines += ["Input models: none recorded (this model starts the lineage).", ""]
        return lines
    lines += ["Input models (one line per earlier stage):", ""]
    for stage in chain[1:]:
        fingerprint = stage["corpus"].get("splits_sha256")
        same = fingerprint is not None and fingerprint == corpus.get("splits_sha256")
        lines.append(f"- {_cell(stage['stage'] or 'unknown stage')}: corpus {_code(fingerprint)}"
                     f"{' (the same corpus)' if same else ''}, {len(stage['subjects'])} subjects, synthetic: "
                     f"{_yes_no(stage['corpus'].get('synthetic'))}")
    lines.append("")
    return lines


def _config_yaml(config: dict) -> str:
    """The config as YAML; values JSON cannot hold (paths, enums) print as their str."""
    plain = json.loads(json.dumps(config, default=str))
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=120).rstrip("\n")


def _figures_block(figures: list[dict] | None, source: str | None) -> str:
    """The figures section between its two markers: a table, or "Not evaluated yet."."""
    lines = [FIGURES_START]
    if not figures:
        lines.append(NOT_EVALUATED)
    else:
        if source:
            lines += [f"Source: {source}.", ""]
        lines += ["Intervals are 95 % bootstrap intervals over test subjects; the difference is the model minus the "
                  "baseline, paired on the same subjects.", "",
                  "| Task | Protocol | Metric | Model [95 % CI] | Baseline | Baseline [95 % CI] | "
                  "Model − baseline [95 % CI] | n |",
                  "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for i, row in enumerate(figures):
            missing = [key for key in ("task", "protocol", "metric", "value") if key not in row]
            if missing:
                raise ValueError(f"figure row {i}: missing {', '.join(missing)} (got {sorted(row)})")
            has_baseline = row.get("baseline") is not None
            cells = [_cell(row["task"]), _cell(row["protocol"]), _cell(row["metric"]),
                     _estimate(row["value"], row.get("ci")),
                     _cell(row["baseline"]) if has_baseline else "—",
                     _estimate(row.get("baseline_value"), row.get("baseline_ci")) if has_baseline else "—",
                     _estimate(row.get("diff"), row.get("diff_ci")) if row.get("diff") is not None else "—",
                     _cell(row.get("n", "—"))]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(FIGURES_END)
    return "\n".join(lines)


def _limits(synthetic: bool, generates_text: bool) -> list[str]:
    lines = [f"- {SYNTHETIC_WARNING}"] if synthetic else []
    lines += ["- A research artefact, not a diagnostic device: it must not inform the care of a person.",
              "- Its figures hold for the cohorts, atlas and preprocessing of its lineage; other scanners, sites, "
              "ages or pipelines may differ. Check a new cohort shares no subject with the lineage before calling "
              "an evaluation external."]
    if generates_text:
        lines.append("- Generated text about a scan can be fluent and wrong; read it against the figures above.")
    return lines + [""]


def _estimate(value, ci) -> str:
    """'0.910 [0.850, 0.960]'; a missing value is 'n/a', a missing interval is left out."""
    text = _number(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{_number(ci[0])}, {_number(ci[1])}]"
    return text


def _number(value) -> str:
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):  # numpy scalars included
        value = float(value)
        if math.isnan(value):
            return "n/a"
        # three decimals suit AUC, accuracy, r; an MAE in years or a large count reads better in 4 digits
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    return _cell(value)


def _cell(value) -> str:
    """A table cell: one line, pipes escaped (a pipe would end the cell)."""
    return str(value).replace("\n", " ").replace("|", "\\|")


def _code(value) -> str:
    return "not recorded" if value in (None, "") else f"`{value}`"


def _yes_no(value) -> str:
    return {True: "yes", False: "no"}.get(value, "not recorded")


def _redact(text: str, chain: list[dict]) -> str:
    """`text` with every trained subject of the lineage (and its bare pseudonym, the part after the dataset)
    replaced: the sections never print them, but a config value or a title could carry one."""
    names: set[str] = set()
    for stage in chain:
        for subject in stage["subjects"]:
            if len(subject) >= 4:  # shorter ones would match inside ordinary words and numbers
                names.add(subject)
            bare = subject.rsplit("-", 1)[-1]
            if len(bare) >= 8:  # a short tail ("01") would also match ordinary numbers
                names.add(bare)
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, REDACTED)
    return text
