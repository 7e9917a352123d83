"""Synthetic captions: a scan's descriptor z-values (against the reference-cohort norms) in plain sentences.

    from corpus_builder.captions import caption_for, caption_claims
    text = caption_for(z, pair_z, missing, CaptionConfig(), seed=hash_of_key)

One sentence (group) per part of the four domains (docs/design.md), in a fixed order: FC within-network strength of
the 7 Yeo networks, subcortical-cortical coupling, the most and least coupled network pairs (largest / smallest
`pair_z`), the functional gradients, the graph metrics, network fALFF (ICA). Each z becomes one of five bins
(markedly lower / lower / typical / higher / markedly higher; thresholds in `CaptionConfig`); descriptors that
share a bin are grouped into one clause, and each sentence has three or more phrasings drawn from
`random.Random(seed)`, so a scan's caption is reproducible and the corpus still varies. A descriptor that is in
`missing`, absent, or NaN is said to be "unavailable"; no value is ever invented for it. With
`cfg.include_numbers`, "(z = 1.3)" follows each name and the bin is taken from the z as written (rounded to one
decimal), so a shown "z = 1.0" never reads "typical".

Captions describe the brain only: they are built from a fixed vocabulary plus numbers, and nothing from the
inputs is copied into them except the numbers themselves (no keys other than the known descriptor and pair
names are read, and the reasons in `missing` are never shown), so no subject id, site or phenotype can leak.

The grammar is deliberately regular so that `caption_claims` can read the qualitative claims back: within a
sentence, clauses are separated by ";" and each clause carries exactly one bin word (or "unavailable"), which
applies to every descriptor named in it; a network name takes its measure (within-network connectivity or
fALFF) from its sentence. `corpus_builder.polish` uses the same reader on an LLM's rephrasing to check that no
claim was lost, changed or added; anything the reader cannot resolve becomes a "?" claim, which never matches.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence

from corpus_builder.config import CaptionConfig
from corpus_builder.descriptors import DOMAINS, PAIR_NAMES

BINS = ("markedly lower", "lower", "typical", "higher", "markedly higher")
UNAVAILABLE = "unavailable"

# Readable network names; the first alias of each is what captions write, the rest are accepted when reading
# a rephrased caption back.
NETWORK_ALIASES: dict[str, tuple[str, ...]] = {
    "Vis": ("visual",),
    "SomMot": ("somatomotor", "sensorimotor"),
    "DorsAttn": ("dorsal attention",),
    "SalVentAttn": ("salience/ventral attention", "salience-ventral attention", "salience and ventral attention",
                    "ventral attention", "salience"),
    "Limbic": ("limbic",),
    "Cont": ("frontoparietal control", "fronto-parietal control", "frontoparietal", "control"),
    "Default": ("default mode", "default-mode", "default"),
    "Subcortical": ("subcortical",),
}
NETWORK_NAMES = {net: aliases[0] for net, aliases in NETWORK_ALIASES.items()}

# Descriptors that are not one-per-network, and the pseudo-descriptor "fc_pairs" (all 28 pairs unavailable).
SCALAR_ALIASES: dict[str, tuple[str, ...]] = {
    "fc_subcortical_cortical": ("subcortical-cortical coupling", "subcortical to cortical coupling",
                                "coupling between subcortical and cortical regions"),
    "fc_pairs": ("network-pair coupling", "network pair coupling"),
    "fg_g1_variance": ("principal gradient variance", "variance of the principal gradient"),
    "fg_g2_variance": ("second gradient variance", "variance of the second gradient"),
    "fg_g1_explained": ("variance explained by the principal gradient", "explained variance of the principal gradient",
                        "principal gradient's explained variance", "principal-gradient explained variance"),
    "fg_default_vis_separation": ("default-visual gradient separation", "default mode-visual gradient separation",
                                  "default-visual separation",
                                  "separation between the default mode and visual networks",
                                  "separation of the default mode and visual networks"),
    "graph_modularity": ("modularity",),
    "graph_global_efficiency": ("global efficiency",),
    "graph_clustering": ("clustering", "average clustering", "clustering coefficient"),
    "graph_strength": ("node strength", "mean node strength", "average node strength"),
}
SCALAR_NAMES = {name: aliases[0] for name, aliases in SCALAR_ALIASES.items()}

FC_WITHIN = tuple(n for n in DOMAINS["FC"] if n.startswith("fc_within_"))
FALFF = DOMAINS["ICA"]
_PAIR_KEYS = {frozenset(name.split("-")): name for name in PAIR_NAMES}

Item = tuple[str, str, str]  # (descriptor name, display label incl. numbers, status)


# ---------------------------------------------------------------------------------------------------- bins

def z_bin(z: float, cfg: CaptionConfig) -> str:
    """The qualitative bin of a z-value: |z| >= cfg.marked_z is 'markedly', >= cfg.shift_z 'lower'/'higher'."""
    if z <= -cfg.marked_z:
        return "markedly lower"
    if z <= -cfg.shift_z:
        return "lower"
    if z >= cfg.marked_z:
        return "markedly higher"
    if z >= cfg.shift_z:
        return "higher"
    return "typical"


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _num(x: float, digits: int) -> str:
    text = f"{float(x):.{digits}f}"
    return text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def _label(name: str, text: str, z: float | None, values: dict | None, cfg: CaptionConfig) -> str:
    if not cfg.include_numbers or z is None:
        return text
    inside = f"z = {_num(z, 1)}"
    if values is not None and _finite(values.get(name)):
        inside += f", value {float(values[name]):.3g}"
    return f"{text} ({inside})"


# ---------------------------------------------------------------------------------------------------- writing

def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _status_order(status: str) -> int:
    # Deviations first (they carry the information), then typical, then what is unavailable.
    return {"markedly higher": 0, "higher": 1, "markedly lower": 2, "lower": 3, "typical": 4}.get(status, 5)


def _groups(items: list[Item]) -> list[tuple[str, list[str]]]:
    by_status: dict[str, list[str]] = {}
    for _, label, status in items:
        by_status.setdefault(status, []).append(label)
    return sorted(by_status.items(), key=lambda kv: _status_order(kv[0]))


def _nets(labels: list[str]) -> str:
    return f"the {_join(labels)} network" + ("s" if len(labels) > 1 else "")


def _network_sentence(measure: str, items: list[Item], rng: random.Random) -> str:
    """One sentence on a per-network measure, networks grouped by bin; three phrasings."""
    groups = _groups(items)

    def t1(status: str, labels: list[str]) -> str:
        if status == UNAVAILABLE:
            return f"unavailable for {_nets(labels)}"
        if status == "typical":
            return f"typical in {_nets(labels)}"
        return f"{status} than in the reference cohort in {_nets(labels)}"

    def t2(status: str, labels: list[str]) -> str:
        if status == UNAVAILABLE:
            return f"unavailable for {_nets(labels)}"
        if status == "typical":
            return f"within the typical range in {_nets(labels)}"
        return f"{status} in {_nets(labels)}"

    def t3(status: str, labels: list[str]) -> str:
        if status == UNAVAILABLE:
            return f"{measure} was unavailable for {_nets(labels)}"
        if status == "typical":
            return f"{_nets(labels)} showed typical {measure}"
        return f"{_nets(labels)} showed {status} {measure} than the norms"

    pick = rng.randrange(3)
    if pick == 0:
        return _cap(measure) + " was " + "; ".join(t1(s, ls) for s, ls in groups) + "."
    if pick == 1:
        return (f"Relative to the reference cohort, {measure} was "
                + "; ".join(t2(s, ls) for s, ls in groups) + ".")
    return _cap("; ".join(t3(s, ls) for s, ls in groups)) + "."


def _scalar_sentence(intro: str, items: list[Item], rng: random.Random) -> str:
    """One sentence on a few single-valued descriptors, grouped by bin; three phrasings."""
    groups = _groups(items)

    def verb(labels: list[str]) -> str:
        return "were" if len(labels) > 1 else "was"

    def t1(i: int, status: str, labels: list[str]) -> str:
        if status in ("typical", UNAVAILABLE):
            return f"{_join(labels)} {verb(labels)} {status}"
        return f"{_join(labels)} {verb(labels)} {status} than in the reference cohort"

    def t2(i: int, status: str, labels: list[str]) -> str:
        if status == "typical":
            return f"{_join(labels)} {verb(labels)} within the typical range"
        return f"{_join(labels)} {verb(labels)} {status}"

    def t3(i: int, status: str, labels: list[str]) -> str:
        if status == UNAVAILABLE:
            return f"{_join(labels)} {verb(labels)} unavailable"
        lead = "this scan showed" if i == 0 else "it showed"
        return f"{lead} {status} {_join(labels)}" + ("" if status == "typical" else " than the norms")

    pick = rng.randrange(3)
    if pick == 0:
        return _cap("; ".join(t1(i, s, ls) for i, (s, ls) in enumerate(groups))) + "."
    if pick == 1:
        return intro + "; ".join(t2(i, s, ls) for i, (s, ls) in enumerate(groups)) + "."
    return _cap("; ".join(t3(i, s, ls) for i, (s, ls) in enumerate(groups))) + "."


def _pair_phrase(pair: str) -> str:
    a, b = pair.split("-")
    return f"between the {NETWORK_NAMES[a]} and {NETWORK_NAMES[b]} networks"


def _pair_sentence(pair_z: dict[str, float], cfg: CaptionConfig, rng: random.Random) -> str:
    """The most and least coupled network pairs relative to the norms; three phrasings."""
    finite = {p: float(pair_z[p]) for p in PAIR_NAMES if p in pair_z and _finite(pair_z[p])}
    pick = rng.randrange(3)
    if not finite:
        return ("Network-pair coupling was unavailable.", "Network-pair coupling is unavailable for this scan.",
                "No network-pair coupling could be computed (unavailable).")[pick]
    most = max(finite, key=lambda p: (finite[p], p))
    least = min(finite, key=lambda p: (finite[p], p))

    def where(pair: str) -> str:
        return _pair_phrase(pair) + (f" (z = {_num(finite[pair], 1)})" if cfg.include_numbers else "")

    first, second = [
        (f"Relative to the norms, coupling was strongest {where(most)}", f"it was weakest {where(least)}"),
        (f"Compared with the reference cohort, the most coupled pair of networks lay {where(most)}",
         f"the least coupled lay {where(least)}"),
        (f"Against the norms, the strongest coupling was seen {where(most)}",
         f"the weakest was seen {where(least)}"),
    ][pick]
    return f"{first}." if most == least else f"{first}; {second}."


def _extremes_sentence(z: dict[str, float], missing: dict[str, str], rng: random.Random) -> str:
    """Which network's within-network connectivity stands out most and least relative to the norms.

    Bins alone lose relative information: a global shift (age, site) can put every network in the same bin
    while the *ordering* of networks still carries phenotype signal (the reference captions likewise name
    extremes).
    """
    finite = {n: float(z[n]) for n in FC_WITHIN if n in z and n not in missing and _finite(z[n])}
    pick = rng.randrange(3)
    if len(finite) < 2:
        return ""
    top = NETWORK_NAMES[max(finite, key=lambda n: (finite[n], n)).removeprefix("fc_within_")]
    bottom = NETWORK_NAMES[min(finite, key=lambda n: (finite[n], n)).removeprefix("fc_within_")]
    return (f"Relative to the norms, within-network connectivity stood out most in the {top} network and least "
            f"in the {bottom} network.",
            f"The {top} network had the relatively strongest within-network connectivity and the {bottom} network "
            "the relatively weakest.",
            f"Of all networks, the {top} network ranked highest against the norms for within-network connectivity, "
            f"the {bottom} network lowest.")[pick]


# ---------------------------------------------------------------------------------------------------- captions

def caption_for(z: dict[str, float], pair_z: dict[str, float], missing: dict[str, str], cfg: CaptionConfig,
                seed: int, values: dict[str, float] | None = None) -> str:
    """The caption of one scan.

    z: descriptor name -> z against the norms; pair_z: network pair ("Vis-SomMot") -> z; missing: descriptor name
    -> reason it is unavailable (the reason is not shown); values: raw descriptor values, shown beside z when
    `cfg.include_numbers`, and a NaN there also marks the descriptor unavailable. The same seed gives the same
    caption.
    """
    rng = random.Random(seed)

    def item(name: str, text: str) -> Item:
        value_nan = values is not None and name in values and not _finite(values[name])
        if name in missing or name not in z or not _finite(z[name]) or value_nan:
            return name, text, UNAVAILABLE
        # With numbers shown, bin the number as written, so "(z = 1.0)" never reads "typical".
        zz = round(float(z[name]), 1) if cfg.include_numbers else float(z[name])
        return name, _label(name, text, zz, values, cfg), z_bin(zz, cfg)

    def network_items(names: Sequence[str], prefix: str) -> list[Item]:
        return [item(n, NETWORK_NAMES[n.removeprefix(prefix)]) for n in names]

    def scalar_items(names: Sequence[str]) -> list[Item]:
        return [item(n, SCALAR_NAMES[n]) for n in names]

    sentences = [  # evaluated in order: each draws its phrasing from rng in turn
        _network_sentence("within-network connectivity", network_items(FC_WITHIN, "fc_within_"), rng),
        _extremes_sentence(z, missing, rng),
        _scalar_sentence("Compared with the reference cohort, ", scalar_items(["fc_subcortical_cortical"]), rng),
        _pair_sentence(pair_z, cfg, rng),
        _scalar_sentence("Along the connectivity gradients, relative to the norms, ", scalar_items(DOMAINS["FG"]), rng),
        _scalar_sentence("In the thresholded connectivity graph, relative to the norms, ",
                         scalar_items(DOMAINS["graph"]), rng),
        _network_sentence("network fALFF", network_items(FALFF, "falff_"), rng),
    ]
    return " ".join(s for s in sentences if s)


# ---------------------------------------------------------------------------------------------------- reading

def _alternation(phrases) -> str:
    # Longest first, so "default mode" wins over "default"; spaces and hyphens are interchangeable.
    out = []
    for p in sorted(set(phrases), key=len, reverse=True):
        out.append(r"[\s\-–]+".join(re.escape(w) for w in re.split(r"[\s\-–]+", p)))
    return "|".join(out)


_NET_ALT = _alternation(a for aliases in NETWORK_ALIASES.values() for a in aliases)
_ENTITY = re.compile(
    r"\b(?:(?P<scalar>" + _alternation(a for aliases in SCALAR_ALIASES.values() for a in aliases) + r")"
    r"|(?P<pair>between\s+(?:the\s+)?(?P<a>" + _NET_ALT + r")(?:\s+networks?)?\s+and\s+(?:the\s+)?(?P<b>"
    + _NET_ALT + r")(?:\s+networks?)?)"
    r"|(?P<net>" + _NET_ALT + r"))\b",
    re.IGNORECASE,
)
_BIN = re.compile(r"\bmarkedly\s+(?:higher|lower)\b|\b(?:higher|lower|typical|unavailable)\b", re.IGNORECASE)
_EXTREME = re.compile(r"\b(?:most|strongest|highest|least|weakest|lowest)\b", re.IGNORECASE)
_CLAUSE = re.compile(r",?\s+(?:while|whereas|but|although)\s+", re.IGNORECASE)
_NUMBER = re.compile(r"[-−+]?\d+(?:\.\d+)?")


def _canon(alt: str, table: dict[str, tuple[str, ...]]) -> str | None:
    key = " ".join(re.split(r"[\s\-–]+", alt.lower()))
    for name, aliases in table.items():
        if any(" ".join(re.split(r"[\s\-–]+", a.lower())) == key for a in aliases):
            return name
    return None


def bin_words(text: str) -> Counter:
    """How often each bin word (and 'unavailable') occurs in a text."""
    return Counter(" ".join(m.group(0).lower().split()) for m in _BIN.finditer(text))


def caption_numbers(text: str) -> Counter:
    """The numbers written in a text (as strings, unicode minus normalised)."""
    return Counter(m.group(0).replace("−", "-").lstrip("+") for m in _NUMBER.finditer(text))


def caption_sentences(text: str) -> list[str]:
    """The sentences of a caption (a decimal point is not a sentence end)."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s]


def caption_claims(text: str) -> set[tuple[str, str]]:
    """The qualitative claims of a caption: (descriptor name, bin or 'unavailable'),
    ('most_coupled_pair' / 'least_coupled_pair', pair name) and ('within_network_most' / '_least', network).
    Unresolvable mentions give '?' claims."""
    return set(_claim_counts(text))


_EXTREMES_FORMS = (  # the three phrasings of `_extremes_sentence`, read back as (top, bottom) network names
    re.compile(r"stood out most in the (?P<top>[\w/ ]+?) network and least in the (?P<bottom>[\w/ ]+?) network"),
    re.compile(r"The (?P<top>[\w/ ]+?) network had the relatively strongest within-network connectivity and "
               r"the (?P<bottom>[\w/ ]+?) network the relatively weakest"),
    re.compile(r"the (?P<top>[\w/ ]+?) network ranked highest against the norms for within-network connectivity, "
               r"the (?P<bottom>[\w/ ]+?) network lowest"),
)


def _extremes_claims(sentence: str) -> list[tuple[str, str]] | None:
    for form in _EXTREMES_FORMS:
        m = form.search(sentence)
        if m:
            return [("within_network_most", _canon(m.group("top"), NETWORK_ALIASES) or "?"),
                    ("within_network_least", _canon(m.group("bottom"), NETWORK_ALIASES) or "?")]
    return None


def _claim_counts(text: str) -> Counter:
    claims: Counter = Counter()
    for sentence in caption_sentences(text):
        extremes = _extremes_claims(sentence)
        if extremes is not None:
            claims.update(extremes)
            continue
        fc = re.search(r"\bwithin[\s\-]+network\b", sentence, re.IGNORECASE) is not None
        falff = re.search(r"\bfalff\b|\blow[\s\-]+frequency\b", sentence, re.IGNORECASE) is not None
        for clause in re.split(r";", sentence):
            for part in _CLAUSE.split(clause):
                claims.update(_clause_claims(part, fc, falff))
    return claims


def _clause_claims(clause: str, fc: bool, falff: bool) -> list[tuple[str, str]]:
    bins = {" ".join(m.group(0).lower().split()) for m in _BIN.finditer(clause)}
    status = bins.pop() if len(bins) == 1 else "?"
    extremes = {"most" if m.group(0).lower() in ("most", "strongest", "highest") else "least"
                for m in _EXTREME.finditer(clause)}
    extreme = extremes.pop() if len(extremes) == 1 else "?"
    out = []
    for m in _ENTITY.finditer(clause):
        if m.group("scalar"):
            out.append((_canon(m.group("scalar"), SCALAR_ALIASES) or "?", status))
        elif m.group("pair"):
            a, b = _canon(m.group("a"), NETWORK_ALIASES), _canon(m.group("b"), NETWORK_ALIASES)
            pair = _PAIR_KEYS.get(frozenset((a, b)), "?")
            out.append((f"{extreme}_coupled_pair" if extreme != "?" else "?", pair))
        else:
            net = _canon(m.group("net"), NETWORK_ALIASES)
            if fc and not falff and f"fc_within_{net}" in FC_WITHIN:
                out.append((f"fc_within_{net}", status))
            elif falff and not fc and f"falff_{net}" in FALFF:
                out.append((f"falff_{net}", status))
            else:
                out.append((f"?{net}", status))
    return out


def same_claims(raw: str, other: str) -> bool:
    """True when `other` makes exactly the claims of `raw`: the same (descriptor, bin) and pair claims, each as
    often (a repeated claim is a symptom of a looping model), no bin word that `raw` does not use, and the same
    numbers."""
    return (_claim_counts(other) == _claim_counts(raw)
            and set(bin_words(other)) <= set(bin_words(raw))
            and caption_numbers(other) == caption_numbers(raw))


__all__ = ["BINS", "NETWORK_NAMES", "UNAVAILABLE", "bin_words", "caption_claims", "caption_for", "caption_numbers",
           "caption_sentences", "same_claims", "z_bin"]
