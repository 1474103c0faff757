"""COCO-style captions of a Shapes scene: five varied, true sentences per image."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from .language import RELATION_WORDS, Desc, article, number_word, plural
from .scene import Obj, Scene, relation

_PICTURE = ("picture", "image", "photo")
_THINGS = ("objects", "shapes")


def _np(obj: Obj, rng: random.Random) -> str:
    """Indefinite noun phrase with a random (always true) subset of attributes."""
    size = obj.size if rng.random() < 0.7 else None
    texture = obj.texture if obj.texture == "striped" and rng.random() < 0.6 else None
    return article(Desc(obj.shape, obj.color, size, texture).noun())


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _background(scene: Scene, rng: random.Random) -> str:
    return rng.choice(("", f" on a {scene.background} background"))


def _list_objects(scene: Scene, rng: random.Random) -> str | None:
    k = min(len(scene.objects), rng.randint(2, 3))
    objs = sorted(rng.sample(scene.objects, k), key=lambda o: o.x)
    picture = article(rng.choice(_PICTURE))
    prefix = rng.choice(("", f"{picture} of ", f"{picture} with "))
    return prefix + _join([_np(o, rng) for o in objs]) + _background(scene, rng)


def _relation(scene: Scene, rng: random.Random) -> str | None:
    options = []
    for a in scene.objects:
        for b in scene.objects:
            for axis in "xy":
                sign = relation(a, b, axis) if a is not b else 0
                if sign:
                    options.append((a, b, RELATION_WORDS[(axis, sign)]))
    if not options:
        return None
    a, b, rel = rng.choice(options)
    verb = rng.choice((" ", " is "))
    return f"{_np(a, rng)}{verb}{rel} {_np(b, rng)}"


def _count_all(scene: Scene, rng: random.Random) -> str | None:
    n = number_word(len(scene.objects))
    things = rng.choice(_THINGS)
    return rng.choice(
        (
            f"{n} {things} on a {scene.background} background",
            f"{n} {things} in the {rng.choice(_PICTURE)}",
            f"a {scene.background} {rng.choice(_PICTURE)} with {n} {things}",
        )
    )


def _by_attribute(scene: Scene, rng: random.Random, attr: str) -> str:
    counts = Counter(getattr(o, attr) for o in scene.objects)
    parts = []
    for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if attr == "shape":
            parts.append(article(value) if n == 1 else f"{number_word(n)} {plural(value)}")
        else:
            noun = "shape" if n == 1 else "shapes"
            parts.append(f"{number_word(n)} {value} {noun}")
    return _join(parts) + _background(scene, rng)


def _shape_counts(scene: Scene, rng: random.Random) -> str | None:
    return _by_attribute(scene, rng, "shape")


def _color_counts(scene: Scene, rng: random.Random) -> str | None:
    return _by_attribute(scene, rng, "color")


def _highlight(scene: Scene, rng: random.Random) -> str | None:
    obj = rng.choice(scene.objects)
    rest = len(scene.objects) - 1
    others = f"{number_word(rest)} other {'shape' if rest == 1 else 'shapes'}"
    return rng.choice(
        (
            f"{_np(obj, rng)} and {others}",
            f"there is {_np(obj, rng)} in the {rng.choice(_PICTURE)}",
            f"{_np(obj, rng)} next to {others}",
        )
    )


def _extreme(scene: Scene, rng: random.Random) -> str | None:
    axis, sign, word = rng.choice((("x", -1, "leftmost"), ("x", 1, "rightmost"),
                                   ("y", -1, "topmost"), ("y", 1, "lowest")))  # fmt: skip
    for obj in scene.objects:
        # `obj` is extreme only if it is clearly beyond every other object along the axis.
        if all(relation(obj, o, axis) == sign for o in scene.objects if o is not obj):
            return f"the {word} shape is {_np(obj, rng)}"
    return None


TEMPLATES: tuple[Callable[[Scene, random.Random], str | None], ...] = (
    _list_objects,
    _relation,
    _count_all,
    _shape_counts,
    _color_counts,
    _highlight,
    _extreme,
)


def make_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` distinct true captions, each from a different template where possible."""
    captions: list[str] = []
    order = list(TEMPLATES)
    rng.shuffle(order)
    for attempt in range(60):
        template = order[attempt % len(order)]
        text = template(scene, rng)
        if text and text not in captions:
            captions.append(text)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"could not write {n} distinct captions for a scene")  # pragma: no cover
