"""Shared phrase building for the Shapes world: noun phrases, plurals, numbers, unique references.

Captions, VQA questions and SNLI-VE hypotheses (and, later, navigation instructions) are all
built from these pieces so that one vocabulary describes the world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scene import COLORS, OBJECT_SIZES, SHAPES, Obj, Scene, matches

NUMBER_WORDS = tuple("zero one two three four five six seven eight nine ten".split())
PLURALS = {"cross": "crosses"}
# Relation words by (axis, sign of a relative to b): sign -1 = a is left of / above b.
RELATION_WORDS = {
    ("x", -1): "to the left of",
    ("x", 1): "to the right of",
    ("y", -1): "above",
    ("y", 1): "below",
}


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


def article(phrase: str) -> str:
    """'a' or 'an' + phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Desc:
    """A partial description of an object: any of size, colour, shape (None = not mentioned)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    texture: str | None = None  # only ever mentioned in captions

    def _modifiers(self) -> list[str]:
        texture = None if self.texture == "solid" else self.texture
        return [w for w in (self.size, texture, self.color) if w]

    def noun(self) -> str:
        """'large red circle', 'red object', 'star', 'object'."""
        return " ".join(self._modifiers() + [self.shape or "object"])

    def nouns(self) -> str:
        """Plural: 'large red circles', 'red objects', 'crosses'."""
        return " ".join(self._modifiers() + [plural(self.shape or "object")])

    def fits(self, obj: Obj) -> bool:
        return matches(obj, self.shape, self.color, self.size)


# Attribute subsets tried for a referring expression, in no particular order.
_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("size",),
    ("color",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color"),
    ("size", "color", "shape"),
)


def referring_descs(scene: Scene, obj: Obj, exclude: str | None = None) -> list[Desc]:
    """All descriptions (not using attribute `exclude`) that pick out `obj` uniquely in `scene`."""
    out = []
    for subset in _SUBSETS:
        if exclude in subset:
            continue
        d = Desc(
            shape=obj.shape if "shape" in subset else None,
            color=obj.color if "color" in subset else None,
            size=obj.size if "size" in subset else None,
        )
        if sum(d.fits(o) for o in scene.objects) == 1:
            out.append(d)
    return out


def refer(scene: Scene, obj: Obj, rng: random.Random, exclude: str | None = None) -> Desc | None:
    """A random unique description of `obj` without `exclude`, or None if there is none."""
    descs = referring_descs(scene, obj, exclude)
    return rng.choice(descs) if descs else None


def ordered_pairs(scene: Scene) -> list[tuple[Obj, Obj]]:
    return [(a, b) for a in scene.objects for b in scene.objects if a is not b]


# Attribute subsets for existence statements; "present" and "absent" draw from the same subsets
# so that the wording says nothing about the truth.
_EXIST_KEEP: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
)


def present_desc(obj: Obj, rng: random.Random) -> Desc:
    """A random (not necessarily unique) description that `obj` fits."""
    return Desc(**{k: getattr(obj, k) for k in rng.choice(_EXIST_KEEP)})


def absent_desc(scene: Scene, obj: Obj, rng: random.Random, tries: int = 12) -> Desc | None:
    """A description near `obj` (one mentioned attribute changed) that fits nothing in `scene`."""
    for _ in range(tries):
        attrs = {"shape": obj.shape, "color": obj.color, "size": obj.size}
        keep = rng.choice(_EXIST_KEEP)
        change = rng.choice(keep)
        pool = {"shape": SHAPES, "color": tuple(COLORS), "size": OBJECT_SIZES}[change]
        attrs[change] = rng.choice([v for v in pool if v != attrs[change]])
        d = Desc(**{k: attrs[k] for k in keep})
        if not any(d.fits(o) for o in scene.objects):
            return d
    return None
