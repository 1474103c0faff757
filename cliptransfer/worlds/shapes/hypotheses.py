"""SNLI-VE hypotheses for a Shapes scene.

Entailment and contradiction come from the same templates (existence, counts of a kind,
relations, colour and size of a uniquely described object): the label is the statement's truth in
the scene, so only the image separates them. Neutral hypotheses mention objects that are really
there but assert something no picture can show (material, weight, drawing order, intentions).
Premises are generic captions (object count and background) that settle none of the hypotheses.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .language import (
    RELATION_WORDS,
    Desc,
    absent_desc,
    article,
    number_word,
    ordered_pairs,
    present_desc,
    refer,
)
from .scene import COLORS, OBJECT_SIZES, SHAPES, Scene, count, relation

_PICTURE = ("picture", "image")


def premise(scene: Scene, rng: random.Random) -> str:
    n = number_word(len(scene.objects))
    things = rng.choice(("objects", "shapes"))
    return rng.choice(
        (
            f"{n} {things} on a {scene.background} background",
            f"a {scene.background} {rng.choice(_PICTURE)} with {n} {things}",
            f"some {things} drawn on a {scene.background} background",
        )
    )


def _exist(scene: Scene, rng: random.Random, truth: bool) -> str | None:
    obj = rng.choice(scene.objects)
    d = present_desc(obj, rng) if truth else absent_desc(scene, obj, rng)
    if d is None:
        return None
    return rng.choice(
        (
            f"there is {article(d.noun())} in the {rng.choice(_PICTURE)}",
            f"the {rng.choice(_PICTURE)} shows {article(d.noun())}",
        )
    )


def _count(scene: Scene, rng: random.Random, truth: bool) -> str | None:
    kind = rng.choice((("color",), ("shape",), ("color", "shape")))
    descs = [Desc(color=c) for c in COLORS] if kind == ("color",) else []
    descs += [Desc(shape=s) for s in SHAPES] if kind == ("shape",) else []
    descs += [Desc(shape=s, color=c) for s in SHAPES for c in COLORS] if len(kind) == 2 else []
    k = rng.randint(0, 3)
    right = [d for d in descs if count(scene, d.shape, d.color) == k]
    wrong = [d for d in descs if count(scene, d.shape, d.color) != k]
    # State k only where both a true and a false statement exist, so that the number and the
    # kind of description in the text carry no information about the label.
    if not right or not wrong:
        return None
    d = rng.choice(right if truth else wrong)
    if k == 0:
        return f"there are no {d.nouns()}"
    if k == 1:
        return f"there is exactly one {d.noun()}"
    return f"there are {number_word(k)} {d.nouns()}"


def _relation(scene: Scene, rng: random.Random, truth: bool) -> str | None:
    pairs = ordered_pairs(scene)
    rng.shuffle(pairs)
    for a, b in pairs:
        axis = rng.choice("xy")
        sign = relation(a, b, axis)
        da, db = refer(scene, a, rng), refer(scene, b, rng)
        if sign and da and db:
            return f"the {da.noun()} is {RELATION_WORDS[(axis, sign if truth else -sign)]} the {db.noun()}"
    return None


def _attribute(scene: Scene, rng: random.Random, truth: bool) -> str | None:
    obj = rng.choice(scene.objects)
    attr = rng.choice(("color", "size"))
    d = refer(scene, obj, rng, exclude=attr)
    if d is None:
        return None
    value = getattr(obj, attr)
    if not truth:
        value = rng.choice([v for v in (COLORS if attr == "color" else OBJECT_SIZES) if v != value])
    return f"the {d.noun()} is {value}"


_MATERIALS = ("wood", "paper", "plastic", "metal", "glass")
_NEUTRAL = (
    "the {a} is made of {material}",
    "the {a} is heavier than the {b}",
    "the {a} was drawn before the {b}",
    "the {a} was drawn last",
    "the {a} is about to move to the {side}",
    "someone is going to add another {shape} next to the {a}",
    "the {a} is the artist's favorite shape",
    "the {a} feels warm to the touch",
)
# Scene-level neutrals need no referring expression (a scene may hold two identical objects).
_NEUTRAL_SCENE = (
    "the shapes were cut out of {material}",
    "the {picture} was drawn by a child",
    "the shapes are about to move to the {side}",
)


def _neutral(scene: Scene, rng: random.Random, truth: bool) -> str | None:
    a, b = rng.choice(ordered_pairs(scene))
    da, db = refer(scene, a, rng), refer(scene, b, rng)
    fill = {
        "material": rng.choice(_MATERIALS),
        "side": rng.choice(("left", "right")),
        "shape": rng.choice(SHAPES),
        "picture": rng.choice(_PICTURE),
    }
    if da is None or db is None or rng.random() < 0.15:
        return rng.choice(_NEUTRAL_SCENE).format(**fill)
    return rng.choice(_NEUTRAL).format(a=da.noun(), b=db.noun(), **fill)


_FACTUAL: tuple[Callable[[Scene, random.Random, bool], str | None], ...] = (
    _exist,
    _count,
    _relation,
    _attribute,
)


def make_hypotheses(scene: Scene, rng: random.Random, per_label: int = 3) -> dict[str, list[str]]:
    """`per_label` distinct hypotheses for each gold label: {label: [hypothesis, ...]}."""
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for label in ("entailment", "neutral", "contradiction"):
        out[label] = []
        for _ in range(50 * per_label):
            if label == "neutral":
                text = _neutral(scene, rng, False)
            else:
                text = rng.choice(_FACTUAL)(scene, rng, label == "entailment")
            if text and text not in seen:
                seen.add(text)
                out[label].append(text)
                if len(out[label]) == per_label:
                    break
        if len(out[label]) < per_label:  # pragma: no cover - counts always give e/c hypotheses
            raise RuntimeError(f"could not write {per_label} {label} hypotheses for a scene")
    return out
