"""VQA v2-style questions about a Shapes scene, with answers balanced against the answer prior.

Families (answer kind): colour, shape and size of a uniquely described object; counting;
existence; spatial relations (yes/no and "what color is the X left of the Y"); comparisons
(same colour, larger/smaller, more X than Y). Yes/no answers are drawn 50/50 per question and
count answers uniformly over the counts available in the scene, so the per-type prior is weak.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .language import (
    RELATION_WORDS,
    Desc,
    absent_desc,
    article,
    ordered_pairs,
    present_desc,
    refer,
)
from .scene import COLORS, OBJECT_SIZES, SHAPES, Scene, count, relation

# The 65 official VQA question types (GT-Vision-Lab/VQA QuestionTypes/mscoco_question_types.txt).
QUESTION_TYPES: tuple[str, ...] = (
    "how many", "is the", "what", "what color is the", "what is the", "is this", "is this a",
    "what is", "are the", "what kind of", "is there a", "what type of", "is it", "what are the",
    "where is the", "is there", "does the", "what color are the", "are these", "are there",
    "which", "is", "what is the man", "is the man", "are", "how", "does this", "what is on the",
    "what does the", "how many people are", "what is in the", "what is this", "do", "what are",
    "are they", "what time", "what sport is", "are there any", "is he", "what color is", "why",
    "where are the", "what color", "who is", "what animal is", "is the woman", "is this an",
    "do you", "how many people are in", "what room is", "has", "is this person",
    "what is the woman", "can you", "why is the", "is the person", "what is the color of the",
    "what is the person", "could", "was", "is that a", "what number is", "what is the name",
    "what brand", "none of the above",
)  # fmt: skip
_PICTURE = ("picture", "image")


@dataclass(frozen=True)
class QA:
    """One question with its canonical answer; `kind` drives the annotator noise model."""

    question: str
    answer: str
    kind: str  # "yes/no", "number", "color", "shape", "size"
    family: str

    @property
    def answer_type(self) -> str:
        return {"yes/no": "yes/no", "number": "number"}.get(self.kind, "other")

    @property
    def question_type(self) -> str:
        return question_type(self.question)


def question_type(question: str) -> str:
    """Longest official question type that is a whole-word prefix of `question`."""
    words = question.lower().rstrip("?").split()
    for n in range(len(words), 0, -1):
        prefix = " ".join(words[:n])
        if prefix in QUESTION_TYPES:
            return prefix
    raise ValueError(f"question {question!r} matches no official VQA question type")


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


# ---- families: each returns a QA or None when the scene does not support it ----


def _color(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    obj = rng.choice(scene.objects)
    d = refer(scene, obj, rng, exclude="color")
    if d is None:
        return None
    q = rng.choice((f"what color is the {d.noun()}?", f"what is the color of the {d.noun()}?"))
    return QA(q, obj.color, "color", "color")


def _shape(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    obj = rng.choice(scene.objects)
    d = refer(scene, obj, rng, exclude="shape")
    if d is None:
        return None
    q = rng.choice((f"what shape is the {d.noun()}?", f"what is the shape of the {d.noun()}?"))
    return QA(q, obj.shape, "shape", "shape")


def _size(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    obj = rng.choice(scene.objects)
    d = refer(scene, obj, rng, exclude="size")
    if d is None:
        return None
    q = rng.choice(
        (
            f"what size is the {d.noun()}?",
            f"is the {d.noun()} small or large?",
            f"is the {d.noun()} large or small?",
        )
    )
    return QA(q, obj.size, "size", "size")


def _count(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    by_answer: dict[int, list[Desc]] = {}
    descs = [Desc()] + [Desc(color=c) for c in COLORS] + [Desc(shape=s) for s in SHAPES]
    descs += [Desc(shape=s, color=c) for s in SHAPES for c in COLORS]
    descs += [Desc(size=z) for z in OBJECT_SIZES] + [
        Desc(shape=s, size=z) for s in SHAPES for z in OBJECT_SIZES
    ]
    for d in descs:
        by_answer.setdefault(count(scene, d.shape, d.color, d.size), []).append(d)
    # Uniform over the counts this scene offers, then uniform over questions with that count.
    n = rng.choice(sorted(by_answer))
    d = rng.choice(by_answer[n])
    where = rng.choice(("are there", f"are in the {rng.choice(_PICTURE)}", "can you see"))
    return QA(f"how many {d.nouns()} {where}?", str(n), "number", "count")


def _exist(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    obj = rng.choice(scene.objects)
    d = present_desc(obj, rng) if want_yes else absent_desc(scene, obj, rng)
    if d is None:
        return None
    q = rng.choice((f"is there {article(d.noun())}?", f"are there any {d.nouns()}?"))
    return QA(q, _yn(want_yes), "yes/no", "exist")


def _relation_yn(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    options = []
    for a, b in ordered_pairs(scene):
        for axis in "xy":
            sign = relation(a, b, axis)
            if sign:
                options.append((a, b, axis, sign))
    rng.shuffle(options)
    for a, b, axis, sign in options:
        da, db = refer(scene, a, rng), refer(scene, b, rng)
        if da and db:
            word = RELATION_WORDS[(axis, sign if want_yes else -sign)]
            return QA(
                f"is the {da.noun()} {word} the {db.noun()}?", _yn(want_yes), "yes/no", "relation"
            )
    return None


def _relation_query(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    options = []
    for ref in scene.objects:
        dref = refer(scene, ref, rng)
        if dref is None:
            continue
        for axis in "xy":
            others = [o for o in scene.objects if o is not ref]
            if any(relation(o, ref, axis) == 0 for o in others):
                continue  # someone is level with the reference: "left of" would be unclear
            for sign in (-1, 1):
                side = [o for o in others if relation(o, ref, axis) == sign]
                for target in side:
                    word = RELATION_WORDS[(axis, sign)]
                    if sum(o.shape == target.shape for o in side) == 1:
                        q = f"what color is the {target.shape} {word} the {dref.noun()}?"
                        options.append(QA(q, target.color, "color", "relation_query"))
                    if sum(o.color == target.color for o in side) == 1:
                        q = f"what shape is the {target.color} object {word} the {dref.noun()}?"
                        options.append(QA(q, target.shape, "shape", "relation_query"))
    return rng.choice(options) if options else None


def _compare(scene: Scene, rng: random.Random, want_yes: bool) -> QA | None:
    kind = rng.choice(("same_color", "larger", "more"))
    pairs = ordered_pairs(scene)
    rng.shuffle(pairs)
    if kind == "same_color":
        # Only ask where both answers are possible: same-colour pairs are rare, and asking
        # whenever "no" is possible would make "no" the prior of this question type.
        found: dict[bool, tuple[Desc, Desc]] = {}
        for a, b in pairs:
            same = a.color == b.color
            if same not in found:
                da, db = refer(scene, a, rng, "color"), refer(scene, b, rng, "color")
                if da and db:
                    found[same] = (da, db)
        if len(found) < 2:
            return None
        da, db = found[want_yes]
        return QA(
            f"are the {da.noun()} and the {db.noun()} the same color?",
            _yn(want_yes),
            "yes/no",
            "compare",
        )
    if kind == "larger":
        for a, b in pairs:
            if a.size != b.size:
                da, db = refer(scene, a, rng, "size"), refer(scene, b, rng, "size")
                if da and db:
                    bigger = a.size == "large"
                    word = "larger" if bigger == want_yes else "smaller"
                    q = f"is the {da.noun()} {word} than the {db.noun()}?"
                    return QA(q, _yn(want_yes), "yes/no", "compare")
        return None
    attr = rng.choice(("color", "shape"))
    values = list(COLORS) if attr == "color" else list(SHAPES)
    rng.shuffle(values)
    for i, u in enumerate(values):
        for v in values[i + 1 :]:
            cu, cv = count(scene, **{attr: u}), count(scene, **{attr: v})
            if cu != cv and (cu or cv):
                first, second = (u, v) if (cu > cv) == want_yes else (v, u)
                da, db = Desc(**{attr: first}), Desc(**{attr: second})
                q = f"are there more {da.nouns()} than {db.nouns()}?"
                return QA(q, _yn(want_yes), "yes/no", "compare")
    return None


FAMILIES: dict[str, tuple[float, Callable[[Scene, random.Random, bool], QA | None]]] = {
    "color": (2.0, _color),
    "shape": (1.5, _shape),
    "size": (1.0, _size),
    "count": (2.0, _count),
    "exist": (1.5, _exist),
    "relation": (1.5, _relation_yn),
    "relation_query": (1.0, _relation_query),
    "compare": (1.5, _compare),
}


def make_questions(scene: Scene, rng: random.Random, lo: int = 4, hi: int = 8) -> list[QA]:
    """`lo`..`hi` distinct questions (fewer only if the scene cannot support more)."""
    n = rng.randint(lo, hi)
    names = list(FAMILIES)
    weights = [FAMILIES[k][0] for k in names]
    out: list[QA] = []
    # The yes/no target survives failed attempts, so families that rarely manage one answer
    # (e.g. "same color: yes") do not skew the overall yes/no balance.
    want_yes = rng.random() < 0.5
    for _ in range(20 * hi):
        name = rng.choices(names, weights)[0]
        qa = FAMILIES[name][1](scene, rng, want_yes)
        if qa is None or any(qa.question == o.question for o in out):
            continue
        out.append(qa)
        if qa.kind == "yes/no":
            want_yes = rng.random() < 0.5
        if len(out) == n:
            break
    return out
