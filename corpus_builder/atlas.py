"""ROI labels, their networks and the atlas order every output uses.

Order: Tian Scale III subcortical ROIs first, then Schaefer-400 cortical ROIs (the order of the reference
implementation and Brain-JEPA). The network of an ROI is parsed from Schaefer / Tian label names
(`7Networks_LH_Default_PFC_1` -> Default, `HIP-head-m-rh` -> Subcortical) or read from a lookup table
(`index`, `label`, `network` columns) for other atlases.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

YEO7 = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")
SUBCORTICAL = "Subcortical"
NETWORKS = YEO7 + (SUBCORTICAL,)

# Schaefer 17-network names map onto the Yeo-7 families
_SEVENTEEN = {"VisCent": "Vis", "VisPeri": "Vis", "SomMotA": "SomMot", "SomMotB": "SomMot",
              "DorsAttnA": "DorsAttn", "DorsAttnB": "DorsAttn", "SalVentAttnA": "SalVentAttn",
              "SalVentAttnB": "SalVentAttn", "LimbicA": "Limbic", "LimbicB": "Limbic", "ContA": "Cont",
              "ContB": "Cont", "ContC": "Cont", "DefaultA": "Default", "DefaultB": "Default",
              "DefaultC": "Default", "TempPar": "Default"}


def network_of(label: str) -> str | None:
    """Yeo-7 network (or 'Subcortical') of a Schaefer or Tian label; None when the name says nothing."""
    parts = label.split("_")
    if len(parts) >= 3 and parts[0] in ("7Networks", "17Networks"):
        name = parts[2]
        if name in YEO7:
            return name
        return _SEVENTEEN.get(name)
    # Tian S1-S4 labels are structure[-subdivision...]-(lh|rh), e.g. HIP-head-m-rh, THA-DPl-lh
    if label.endswith(("-lh", "-rh")):
        return SUBCORTICAL
    return None


def is_subcortical(label: str, networks: dict[str, str] | None = None) -> bool:
    """Subcortical by the lookup `networks` (label -> network) when it has the label, else by the name."""
    if networks is not None and label in networks:
        return networks[label] == SUBCORTICAL
    return network_of(label) == SUBCORTICAL


def read_networks(lookup: Path) -> dict[str, str]:
    """A lookup table (TSV with `label` and `network` columns; others ignored) as label -> network."""
    table = pd.read_csv(lookup, sep="\t")
    missing = {"label", "network"} - set(table.columns)
    if missing:
        raise ValueError(f"{lookup}: missing columns {sorted(missing)}")
    return dict(zip(table["label"].astype(str), table["network"].astype(str)))


def roi_table(labels: list[str], lookup: Path | None = None) -> pd.DataFrame:
    """Atlas-order table (index, label, network) for `labels`, which must already be in atlas order.

    Networks come from the label names, or from `lookup` (a TSV with `label` and `network`) when given.
    Raises ValueError naming the first label whose network cannot be determined.
    """
    if lookup is not None:
        mapping = read_networks(lookup)
        networks = [mapping.get(lbl) for lbl in labels]
    else:
        networks = [network_of(lbl) for lbl in labels]
    for lbl, net in zip(labels, networks):
        if net is None:
            where = f" in {lookup}" if lookup else " (not a Schaefer/Tian name; give a lookup table)"
            raise ValueError(f"ROI {lbl!r} has no network{where}")
    return pd.DataFrame({"index": range(len(labels)), "label": labels, "network": networks})


def atlas_order(labels: list[str], networks: dict[str, str] | None = None) -> list[int]:
    """Permutation putting subcortical (Tian) ROIs first, then cortical ones, each keeping its own order.

    `networks` (label -> network, e.g. `read_networks(lookup)`) decides for atlases whose names say
    nothing (AAL2's `Thalamus_L` is subcortical only by the table); labels it lacks are judged by name.
    """
    sub = [i for i, lbl in enumerate(labels) if is_subcortical(lbl, networks)]
    cortex = [i for i, lbl in enumerate(labels) if not is_subcortical(lbl, networks)]
    return sub + cortex


# --- label sets used by the synthetic cohort and the tests --------------------------------------------

# ROIs per Yeo-7 network in Schaefer-400 (7 networks), left then right hemisphere.
SCHAEFER400_SIZES = {"LH": (31, 37, 23, 22, 13, 22, 52), "RH": (30, 40, 23, 24, 13, 25, 45)}


def schaefer400_labels() -> list[str]:
    """Schaefer-400 (7 networks) label names in the atlas's own order (LH networks, then RH)."""
    labels = []
    for hemi, sizes in SCHAEFER400_SIZES.items():
        for net, size in zip(YEO7, sizes):
            labels += [f"7Networks_{hemi}_{net}_{i + 1}" for i in range(size)]
    return labels


_TIAN_S3_RH = ("HIP-head-m", "HIP-head-l", "HIP-body-m", "HIP-body-l", "AMY-lAMY", "AMY-mAMY", "THA-DPm",
               "THA-DPl", "THA-VPm", "THA-VPl", "THA-VAi", "THA-VAs", "THA-DAm", "THA-DAl", "PUT-VA",
               "PUT-DA", "PUT-VP", "PUT-DP", "CAU-body", "CAU-tail", "CAU-VA", "CAU-DA", "NAc-shell",
               "NAc-core", "pGP")


def tian_s3_labels() -> list[str]:
    """Tian Scale III label names (25 per hemisphere, right then left, as the atlas orders them)."""
    return [f"{name}-rh" for name in _TIAN_S3_RH] + [f"{name}-lh" for name in _TIAN_S3_RH]


def default_labels() -> list[str]:
    """The 450 default ROIs in atlas order: Tian S3 then Schaefer-400."""
    return tian_s3_labels() + schaefer400_labels()
