"""Instruction data of a scan (the `qa.json` member of a shard sample; used only in stage 3).

    from corpus_builder.instructions import instruction_items
    items = instruction_items(record.phenotypes, caption, seed, InstructionConfig())

Every item is a plain JSON object:

    {"type": "qa" | "multi_turn" | "multi_target" | "description",
     "attribute": "sex" | ["sex", "age"] | "description",     # a list for multi_turn / multi_target
     "turns": [{"role": "user", "content": "Sex?"}, {"role": "assistant", "content": "Male"}, ...],
     "answer": "Male" | {"sex": "Male", "age": "63 years (60s)"} | "<description text>"}

- `qa`: one question about one attribute, the answer is the canonical answer.
- `multi_turn`: 2-3 attributes asked one after the other in one conversation (user/assistant alternating).
- `multi_target`: one question asking for 2-3 attributes at once, answered as "Sex: Male. Age: 63 years (60s)."
- `description`: an open-ended request; the answer is the caption plus one sentence of phenotype context built
  only from the phenotypes the scan has.

The scan itself is not in the item: the stage-3 trainer puts the scan's brain tokens in front of the first user
turn. Canonical answers: sex "Male" / "Female"; age "63 years (60s)" (rounded years and the decade);
fluid intelligence the score ("7", "7.5"); diagnosis a full name ("Alzheimer's disease", "ADHD", "autism spectrum
disorder", ...) or "no diagnosis" for controls (CN, HC, TD, ...). An attribute the scan does not have, or cannot be
read, is skipped, never invented; only the four attributes of `records.PHENOTYPES` are read, so nothing else from
the phenotype dict (ids, site) can reach an item. Questions are drawn from several phrasings with a seeded RNG.
"""

from __future__ import annotations

import math
import random
import re

from corpus_builder.config import InstructionConfig
from corpus_builder.records import PHENOTYPES

QUESTIONS: dict[str, tuple[str, ...]] = {
    "sex": ("Sex?", "What is the sex of this participant?", "Is this scan from a male or a female participant?",
            "Based on this scan, what is the participant's sex?"),
    "age": ("Age?", "How old is this participant?", "What is the participant's age?",
            "Estimate the age of the person this scan comes from."),
    "fluid_intelligence": ("Fluid intelligence?", "What is the participant's fluid intelligence score?",
                           "Estimate the fluid intelligence score from this scan.",
                           "How high is this participant's fluid intelligence score?"),
    "diagnosis": ("Diagnosis?", "What is the diagnosis for this participant?",
                  "Does this participant have a diagnosis? If so, which one?",
                  "Which clinical diagnosis, if any, does this scan suggest?"),
}
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "sex": ("And the sex?", "What about the participant's sex?", "Is the participant male or female?"),
    "age": ("And the age?", "What about the age?", "How old is the participant?"),
    "fluid_intelligence": ("And the fluid intelligence score?", "What about fluid intelligence?",
                           "What fluid intelligence score would you expect?"),
    "diagnosis": ("And the diagnosis?", "What about a diagnosis?", "Is there a clinical diagnosis?"),
}
MULTI_TARGET: tuple[str, ...] = ("What are the {list} of this participant?", "Report the participant's {list}.",
                                 "From this scan, give the {list}.")
DESCRIBE: tuple[str, ...] = ("Describe this resting-state fMRI scan.", "What does this scan show?",
                             "Give a description of this brain scan.",
                             "Summarise the functional profile of this scan relative to the norms.")
LABELS = {"sex": "sex", "age": "age", "fluid_intelligence": "fluid intelligence score", "diagnosis": "diagnosis"}

NO_DIAGNOSIS = "no diagnosis"
DIAGNOSES = {
    **dict.fromkeys(("cn", "hc", "nc", "td", "tdc", "control", "controls", "healthy", "healthy control", "none",
                     "no diagnosis"), NO_DIAGNOSIS),
    "ad": "Alzheimer's disease", "alzheimer's disease": "Alzheimer's disease", "dementia": "Alzheimer's disease",
    "adhd": "ADHD",
    "asd": "autism spectrum disorder", "autism": "autism spectrum disorder",
    "autism spectrum disorder": "autism spectrum disorder",
    "mci": "mild cognitive impairment", "emci": "early mild cognitive impairment",
    "lmci": "late mild cognitive impairment",
}
_MISSING = {"", "n/a", "na", "nan", "none given", "unknown", "missing"}
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9 '/\-]{0,40}")


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _years(age: float) -> int:
    return math.floor(age + 0.5)


def canonical_answers(phenotypes: dict) -> dict[str, str]:
    """Canonical answer per available attribute (in `PHENOTYPES` order); unreadable values are left out."""
    out: dict[str, str] = {}
    sex = str(phenotypes.get("sex", "")).strip().lower()
    if sex in ("m", "male"):
        out["sex"] = "Male"
    elif sex in ("f", "female"):
        out["sex"] = "Female"
    age = _finite(phenotypes.get("age"))
    if age is not None and age >= 0:
        years = _years(age)
        out["age"] = f"{years} years ({'under 10' if years < 10 else f'{years // 10 * 10}s'})"
    fi = _finite(phenotypes.get("fluid_intelligence"))
    if fi is not None:
        out["fluid_intelligence"] = f"{round(fi, 1):g}"
    dx = phenotypes.get("diagnosis")
    if isinstance(dx, str) and dx.strip().lower() not in _MISSING:
        code = " ".join(dx.split())
        if code.lower() in DIAGNOSES:
            out["diagnosis"] = DIAGNOSES[code.lower()]
        elif _CODE.fullmatch(code):
            out["diagnosis"] = code  # a code we have no full name for: passed through as written
    return {k: out[k] for k in PHENOTYPES if k in out}


def phenotype_sentence(phenotypes: dict) -> str:
    """One sentence of context from the available phenotypes ('' when there are none)."""
    answers = canonical_answers(phenotypes)
    if not answers:
        return ""
    words = []
    if "age" in answers:
        words.append(f"{_years(float(phenotypes['age']))}-year-old")
    if "sex" in answers:
        words.append(answers["sex"].lower())
    words.append("participant")
    article = "an" if re.match(r"8|1[18]\b|1[18]-", words[0]) else "a"
    tail = []
    if "diagnosis" in answers:
        dx = answers["diagnosis"]
        tail.append("with no diagnosis" if dx == NO_DIAGNOSIS else f"diagnosed with {dx}")
    if "fluid_intelligence" in answers:
        tail.append(f"with a fluid intelligence score of {answers['fluid_intelligence']}")
    return f"The scan comes from {article} {' '.join(words)}" + (" " + ", ".join(tail) if tail else "") + "."


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    turns = []
    for question, answer in pairs:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _listing(names: list[str]) -> str:
    labels = [LABELS[n] for n in names]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def instruction_items(phenotypes: dict, caption: str, seed: int, cfg: InstructionConfig) -> list[dict]:
    """The instruction items of one scan (schema in the module docstring); JSON-serialisable."""
    rng = random.Random(seed + cfg.seed_offset)
    answers = canonical_answers(phenotypes)
    items: list[dict] = []
    for attr, answer in answers.items():
        pool = QUESTIONS[attr]
        k = cfg.qa_per_attribute
        questions = rng.sample(pool, k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]
        items += [{"type": "qa", "attribute": attr, "turns": _turns((q, answer)), "answer": answer}
                  for q in questions]
    attrs = list(answers)
    if len(attrs) >= 2:
        for _ in range(cfg.multi_turn):
            chosen = rng.sample(attrs, rng.randint(2, min(3, len(attrs))))
            pairs = [(rng.choice(QUESTIONS[chosen[0]]), answers[chosen[0]])]
            pairs += [(rng.choice(FOLLOW_UPS[a]), answers[a]) for a in chosen[1:]]
            items.append({"type": "multi_turn", "attribute": chosen, "turns": _turns(*pairs),
                          "answer": {a: answers[a] for a in chosen}})
        for _ in range(cfg.multi_target):
            picked = set(rng.sample(attrs, rng.randint(2, min(3, len(attrs)))))
            chosen = [a for a in attrs if a in picked]  # asked in the usual order: sex, age, ...
            question = rng.choice(MULTI_TARGET).format(list=_listing(chosen))
            reply = " ".join(f"{LABELS[a][:1].upper()}{LABELS[a][1:]}: {answers[a]}." for a in chosen)
            items.append({"type": "multi_target", "attribute": chosen, "turns": _turns((question, reply)),
                          "answer": {a: answers[a] for a in chosen}})
    if cfg.description and caption:
        context = phenotype_sentence(phenotypes)
        text = caption.strip() + (" " + context if context else "")
        items.append({"type": "description", "attribute": "description",
                      "turns": _turns((rng.choice(DESCRIBE), text)), "answer": text})
    return items


__all__ = ["QUESTIONS", "canonical_answers", "instruction_items", "phenotype_sentence"]
