"""The pipeline config: YAML in, typed and validated models out.

Each stage keeps its own small config model next to its code (`corpus_builder.config`, ...); this module
assembles them into `PipelineConfig`, loads YAML files, applies `--set a.b=c` overrides and turns every
validation problem into a one-line `ConfigError` that names the file and the key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from corpus_builder.config import CorpusConfig, SynthConfig
from evaluation.config import EvalConfig
from fmrilm_core.config import StrictModel
from fmrilm_core.errors import InputError
from llm_train.config import InstructConfig, LLMAlignConfig
from tokenizer_train.config import TokenizerTrainConfig


class ConfigError(InputError):
    """A config file or override that does not validate; the message is one line."""


class TrackingConfig(StrictModel):
    # None = $MLFLOW_TRACKING_URI if set, else sqlite:///<workdir>/mlflow.db
    uri: str | None = None
    experiment: str | None = Field(None, description="defaults to the config name")


class PipelineConfig(StrictModel):
    name: str = "demo"
    seed: int = 0
    workdir: Path = Path("runs/demo")
    tracking: TrackingConfig = TrackingConfig()
    synth: SynthConfig = SynthConfig()
    corpus: CorpusConfig = CorpusConfig()
    tokenizer: TokenizerTrainConfig = TokenizerTrainConfig()
    align: LLMAlignConfig = LLMAlignConfig()
    instruct: InstructConfig = InstructConfig()
    eval: EvalConfig = EvalConfig()
    ablations: dict[str, list[str]] = Field(
        default_factory=dict, description="name -> `key=value` overrides (as --set) of a variant whose tokenizer, "
                                          "align, instruct and eval stages run on the same corpus, reported beside "
                                          "the main model (fmrilm.ablations)")
    workers: int = Field(0, ge=0, description="Ray Train workers for training stages; 0 = in-process")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict; values are parsed as YAML scalars/lists (`a.b=3`, `x=[1,2]`)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = f"{first['msg']} (got {first.get('input')!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{origin}: {key}: {problem}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the built-in defaults when `path` is None) and apply `--set` overrides."""
    data: dict = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + --set"
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from None


def with_value(config: StrictModel, path: str, value: Any) -> StrictModel:
    """A copy of `config` with the dotted key `path` set to `value` (the original is left as it is), the key marked
    as set at every level, as a YAML file naming it would (`model_fields_set`: what a user set explicitly)."""
    head, _, rest = path.partition(".")
    new = with_value(getattr(config, head), rest, value) if rest else value
    return config.model_copy(update={head: new})


def to_yaml(config: StrictModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_resolved(config: StrictModel, out_dir: Path) -> Path:
    """Write the resolved config next to an output; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.resolved.yaml"
    path.write_text(to_yaml(config))
    return path


def flatten(config: StrictModel | dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    data = config.model_dump(mode="json") if isinstance(config, StrictModel) else config
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat
