"""Instruction data of a scan (the `qa.json` member of a shard sample; used only in stage 3).

    from corpus_builder.instructions import instruction_items
    items = instruction_items(record.phenotypes, caption, seed, InstructionConfig())

Every item is a plain JSON object:

    {"type": "qa" | "multi_turn" | "multi_target" | "description",
     "attribute": "sex" | ["sex", "age"] | "description",     # a list for multi_turn / multi_target
     "turns": [{"role": "user", "content": "Sex?"}, {"role": "assistant", "content": "Male"}, ...],
     "answer": "Male" | {"sex": "Male", "age": "63 years (60s)"} | "<description text>",
     "caption": "<caption>", "context": {"sex": "Male", ...}}        # description items only

- `qa`: one question about one attribute, the answer is the canonical answer.
- `multi_turn`: 2-3 attributes asked one after the other in one conversation (user/assistant alternating).
- `multi_target`: one question asking for 2-3 attributes at once, answered as "Sex: Male. Age: 63 years (60s)."
- `description`: an open-ended request; the answer is the caption plus one sentence of phenotype context built
  only from the phenotypes the scan has. The item also keeps its two pieces, `caption` and `context` (the canonical
  answers the sentence names), so stage 3 can rebuild it without some attributes.

Leaving attributes out of the tuning mix (`without_attributes`, the zero-shot protocol of `fmrilm eval`) must take
them out of every item, not only drop the items that ask about them: a description still ending "... a 63-year-old
male participant diagnosed with ADHD." would teach sex and ADHD all the same. So qa items of an excluded attribute
go, multi-turn / multi-target items lose its turns / its part of the question and reply (and go when nothing is
left), and description items get their context sentence rebuilt from the remaining phenotypes. `item_attributes`
says which attributes an item teaches; stage 3 records the union over the items it trained on, and eval reads it.
Corpora built before `caption` / `context` existed still work: pass the scan's phenotypes and caption (the corpus
readers have both) and the description is rebuilt from them.

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


def context_sentence(answers: dict[str, str]) -> str:
    """One sentence of context from canonical answers (`canonical_answers`; '' when there are none)."""
    answers = {k: answers[k] for k in PHENOTYPES if k in answers}
    if not answers:
        return ""
    words = []
    if "age" in answers:
        words.append(f"{int(answers['age'].split()[0])}-year-old")  # "63 years (60s)" -> 63
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


def phenotype_sentence(phenotypes: dict) -> str:
    """One sentence of context from the available phenotypes ('' when there are none)."""
    return context_sentence(canonical_answers(phenotypes))


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
        items.append(_description(rng.choice(DESCRIBE), caption, answers))
    return items


def _description(request: str, caption: str, context: dict[str, str]) -> dict:
    sentence = context_sentence(context)
    text = caption.strip() + (" " + sentence if sentence else "")
    return {"type": "description", "attribute": "description", "turns": _turns((request, text)), "answer": text,
            "caption": caption, "context": dict(context)}


def _multi_attrs(item: dict) -> list[str]:
    attrs = item["attribute"]
    return list(attrs) if isinstance(attrs, list) else [attrs]


def _first_question(attr: str, asked: str) -> str:
    """The opening question for `attr` where its turn was a follow-up ("And the age?" cannot open a conversation):
    the opening phrasing at the follow-up's index, so the rewrite is deterministic and still varies."""
    follow = FOLLOW_UPS[attr]
    k = follow.index(asked) if asked in follow else 0
    return QUESTIONS[attr][k % len(QUESTIONS[attr])]


def _target_question(asked: str, before: list[str], after: list[str]) -> str:
    """The multi-target question for the attributes `after`, in the phrasing `asked` used for `before`."""
    template = next((t for t in MULTI_TARGET if t.format(list=_listing(before)) == asked), MULTI_TARGET[0])
    question = template.format(list=_listing(after))
    return question.replace("What are the ", "What is the ") if len(after) == 1 else question


def without_attributes(item: dict, exclude, phenotypes: dict | None = None, caption: str | None = None
                       ) -> dict | None:
    """`item` as it reads with the attributes in `exclude` taken out of every turn; None when nothing is left.

    qa: None if its attribute is excluded. multi_turn: the excluded attributes' question/answer pairs removed (a
    follow-up that now opens the conversation becomes an opening question); multi_target: the question asks for, and
    the reply gives, the remaining attributes only; either is None with no attribute left and stays (still of its
    type) with one. description: the context sentence rebuilt from the remaining phenotypes; it always stays (the
    caption is phenotype-free). A description item of a corpus built before `caption` / `context` were stored needs
    the scan's `phenotypes` (a dict as `canonical_answers` reads it) and `caption`; the result has both fields, so
    `item_attributes` can read it. The input item is never changed."""
    exclude = set(exclude)
    kind = item["type"]
    if kind == "qa":
        return None if item["attribute"] in exclude else dict(item)
    if kind == "description":
        if "caption" in item and "context" in item:
            caption, context = item["caption"], item["context"]
        elif phenotypes is not None and caption is not None:
            context = canonical_answers(phenotypes)
        else:
            raise ValueError("a description item without its caption and context: pass the scan's phenotypes and "
                             "caption")
        request = item["turns"][0]["content"]
        return _description(request, caption, {k: v for k, v in context.items() if k not in exclude})
    if kind not in ("multi_turn", "multi_target"):
        raise ValueError(f"unknown instruction item type {kind!r}")
    before = _multi_attrs(item)
    kept = [a for a in before if a not in exclude]
    if not kept:
        return None
    if kept == before:
        return dict(item)
    answers = {a: item["answer"][a] for a in kept}
    if kind == "multi_turn":
        asked = dict(zip(before, (t["content"] for t in item["turns"][0::2])))
        if kept[0] != before[0]:
            asked[kept[0]] = _first_question(kept[0], asked[kept[0]])
        turns = _turns(*[(asked[a], answers[a]) for a in kept])
    else:
        question = _target_question(item["turns"][0]["content"], before, kept)
        turns = _turns((question, " ".join(f"{LABELS[a][:1].upper()}{LABELS[a][1:]}: {answers[a]}." for a in kept)))
    return {**item, "attribute": kept, "turns": turns, "answer": answers}


def item_attributes(item: dict) -> set[str]:
    """The attributes (of `records.PHENOTYPES`) an item teaches: a qa item's attribute, every attribute of a
    multi-turn / multi-target item, the phenotypes a description's context sentence names. An old-format description
    (no `context`) raises: rewrite it with `without_attributes` first."""
    if item["type"] == "description":
        if "context" not in item:
            raise ValueError("a description item without its context: rewrite it with without_attributes first")
        return set(item["context"])
    return set(_multi_attrs(item))


__all__ = ["DIAGNOSES", "QUESTIONS", "canonical_answers", "context_sentence", "instruction_items", "item_attributes",
           "phenotype_sentence", "without_attributes"]
