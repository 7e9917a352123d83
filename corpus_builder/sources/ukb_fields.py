"""UK Biobank phenotypes from a field table: `eid` plus one column per field (`<field>-<instance>.<array>`).

The fields that mean sex, age and fluid intelligence are configured (`UKBConfig.fields`, defaults 31-0.0,
21003-2.0, 20016-2.0; a `site` or `diagnosis` entry is read too, e.g. site: 54-2.0). Column names of the
common exports are understood: `31-0.0` (ukbconv), `f.31.0.0` (ukbtools / R), `p31_i0` / `p31` (the
Research Analysis Platform). Only the needed columns are parsed, so a many-GB main table is fine.
"""

from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path

import pandas as pd

from corpus_builder.config import UKBConfig
from fmrilm_core.errors import InputError

EID_COLUMNS = ("eid", "f.eid", "participant.eid", "participant_eid")
_FIELD = re.compile(r"^(\d+)-(\d+)\.(\d+)$")
_RAP = re.compile(r"^p(\d+)(?:_i(\d+))?(?:_a(\d+))?$")
_R = re.compile(r"^f\.(\d+)\.(\d+)\.(\d+)$")
_SEX_WORDS = {"MALE": "M", "FEMALE": "F", "M": "M", "F": "F"}


def canonical_field(column: str) -> str:
    """`f.31.0.0` / `p31_i0` / `p31` -> `31-0.0`; other names unchanged."""
    column = column.strip()
    if m := _R.match(column):
        return f"{m[1]}-{m[2]}.{m[3]}"
    if m := _RAP.match(column):
        return f"{m[1]}-{m[2] or 0}.{m[3] or 0}"
    return column


def _at_instance(field: str, instance: str | None, available: set[str]) -> str:
    """The same field at the scan's imaging instance when the table has it (21003-2.0 -> 21003-3.0)."""
    m = _FIELD.match(field)
    if instance is None or not m:
        return field
    moved = f"{m[1]}-{instance}.{m[3]}"
    return moved if moved in available else field


def _separator(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        header = f.readline()
    return "\t" if header.count("\t") >= header.count(",") else ","


def read_ukb_fields(path: Path | str, cfg: UKBConfig, instance: str | None = None) -> dict[str, dict]:
    """eid -> phenotypes (canonical keys of `records.PHENOTYPES`, plus `site` when configured).

    `instance`: the imaging visit of the scans (UKB instance 2 or 3); a configured per-visit field such as
    age 21003-2.0 is then read at that instance when the table has it. Missing values are left out.
    Raises InputError when the table cannot be read, has no eid column or none of the configured fields.
    """
    path = Path(path)
    try:
        sep = _separator(path)
        header = pd.read_csv(path, sep=sep, nrows=0).columns
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the UKB field table ({type(exc).__name__})") from None
    names = {canonical_field(c): c for c in header}
    eid = next((c for c in header if c.strip().lower() in EID_COLUMNS), None)
    if eid is None:
        raise InputError(f"{path}: no eid column in the UKB field table")
    wanted = {key: _at_instance(field, instance, set(names)) for key, field in cfg.fields.items()}
    missing = sorted(f for f in wanted.values() if f not in names)
    if len(missing) == len(wanted):
        raise InputError(f"{path}: none of the configured UKB fields ({', '.join(missing)}) are in the table")
    if missing:
        warnings.warn(f"{path.name}: UKB fields {', '.join(missing)} not in the table; left out",
                      stacklevel=2)
    columns = {key: names[field] for key, field in wanted.items() if field in names}
    table = pd.read_csv(path, sep=sep, dtype=str, usecols=[eid, *columns.values()],
                        na_values=["", "NA", "n/a", "nan"], keep_default_na=False)
    sex_codes = {str(k): v for k, v in cfg.sex_codes.items()}
    out: dict[str, dict] = {}
    for row in table.itertuples(index=False):
        values = dict(zip(table.columns, row))
        phenotypes: dict = {}
        for key, column in columns.items():
            value = values[column]
            if not isinstance(value, str) or not value.strip():
                continue
            value = value.strip()
            if key == "sex":
                code = value[:-2] if value.endswith(".0") else value
                sex = sex_codes.get(code) or _SEX_WORDS.get(value.upper())
                if sex:
                    phenotypes["sex"] = sex
            elif key in ("age", "fluid_intelligence"):
                number = pd.to_numeric(value, errors="coerce")
                if pd.notna(number):
                    phenotypes[key] = float(number)
            elif key in ("diagnosis", "site"):
                phenotypes[key] = value[:-2] if key == "site" and value.endswith(".0") else value
        out[str(values[eid]).strip().removesuffix(".0")] = phenotypes
    return out
