"""Scene model of the Shapes world: pure data (dataclasses), geometry, predicates and sampling.

Nothing here draws pixels or writes words: `render.py` turns a `Scene` into an image and the
language modules turn it into captions, questions and hypotheses. Coordinates are canvas pixels
(x right, y down); a canvas may later be larger than one image (navigation panoramas), which is
why rendering takes an optional `View`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# Object colours: name -> base RGB. Chosen to stay distinct after jitter and JPEG.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (235, 215, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "purple": (140, 55, 180),
    "gray": (140, 140, 140),
    "white": (242, 242, 242),
}
# Backgrounds are dark so every object colour contrasts with every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 26),
    "brown": (92, 62, 40),
    "teal": (24, 92, 96),
    "navy": (24, 30, 82),
}
OBJECT_SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped")
# Half-extent (px at 160x120) ranges per size class: large is about twice small.
RADIUS: dict[str, tuple[float, float]] = {"small": (8.0, 10.5), "large": (16.0, 20.0)}
# Centres closer than this along an axis give no left/right (above/below) relation.
RELATION_MARGIN = 8.0
COLOR_JITTER = 15
STRIPED_PROB = 0.25


@dataclass(frozen=True)
class Obj:
    """One object: symbolic attributes plus the geometry needed to draw and box it."""

    shape: str
    color: str
    size: str
    texture: str
    x: float  # centre, canvas px
    y: float
    radius: float  # half extent before rotation
    rotation: float = 0.0  # degrees, clockwise on screen
    rgb: tuple[int, int, int] = (0, 0, 0)  # jittered fill colour

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Tight (x1, y1, x2, y2) box of the drawn outline, canvas px."""
        if self.shape == "circle":
            r = self.radius
            return (self.x - r, self.y - r, self.x + r, self.y + r)
        pts = outline(self)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Scene:
    """A flat canvas with a background and objects; `noise_seed` makes rendering a pure function."""

    width: int
    height: int
    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    noise: float = 0.0  # std of per-pixel Gaussian noise (0-255 scale)
    noise_seed: int = 0


def _polygon(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * i / n),
            radius * math.sin(phase + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _unit_outline(shape: str, r: float) -> list[tuple[float, float]]:
    """Outline vertices around the origin before rotation (circle: a 32-gon)."""
    if shape == "circle":
        return _polygon(32, r, 0.0)
    if shape == "square":
        s = r * 0.86  # so a square's area is close to a circle's of the same radius class
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0.0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]
    if shape == "diamond":
        return [(0.0, -r), (r * 0.72, 0.0), (0.0, r), (-r * 0.72, 0.0)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + math.pi * i / 5
            pts.append((rad * math.cos(ang), rad * math.sin(ang)))
        return pts
    if shape == "cross":
        a, b = r * 0.33, r * 0.92
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def outline(obj: Obj) -> list[tuple[float, float]]:
    """Rotated outline vertices of `obj` in canvas px."""
    c, s = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))
    return [
        (obj.x + c * u - s * v, obj.y + s * u + c * v)
        for u, v in _unit_outline(obj.shape, obj.radius)
    ]


# ---- predicates (shared by captions, questions, hypotheses and later instructions) ----


def matches(
    obj: Obj, shape: str | None = None, color: str | None = None, size: str | None = None
) -> bool:
    """Whether `obj` fits a partial description (None = any)."""
    return (
        (shape is None or obj.shape == shape)
        and (color is None or obj.color == color)
        and (size is None or obj.size == size)
    )


def count(
    scene: Scene, shape: str | None = None, color: str | None = None, size: str | None = None
) -> int:
    return sum(matches(o, shape, color, size) for o in scene.objects)


def relation(a: Obj, b: Obj, axis: str) -> int:
    """Sign of `a` relative to `b` along 'x' or 'y': -1 left/above, +1 right/below, 0 unclear."""
    d = (a.x - b.x) if axis == "x" else (a.y - b.y)
    if abs(d) <= RELATION_MARGIN:
        return 0
    return -1 if d < 0 else 1


# ---- sampling ----


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def sample_object(
    rng: random.Random,
    x: float,
    y: float,
    shape: str | None = None,
    color: str | None = None,
    size: str | None = None,
    radius: float | None = None,
) -> Obj:
    """An object at (x, y); unspecified attributes are drawn uniformly."""
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(list(COLORS))
    size = size or rng.choice(OBJECT_SIZES)
    texture = "striped" if rng.random() < STRIPED_PROB else "solid"
    radius = radius if radius is not None else rng.uniform(*RADIUS[size])
    rotation = rng.uniform(-12.0, 12.0) if shape != "circle" else 0.0
    return Obj(
        shape,
        color,
        size,
        texture,
        x,
        y,
        radius,
        rotation,
        _jitter(COLORS[color], rng, COLOR_JITTER),
    )


def _background(rng: random.Random) -> tuple[str, tuple[int, int, int], float, int]:
    name = rng.choice(list(BACKGROUNDS))
    return name, _jitter(BACKGROUNDS[name], rng, 10), rng.uniform(2.0, 8.0), rng.getrandbits(63)


def sample_scene(
    rng: random.Random,
    width: int = 160,
    height: int = 120,
    min_objects: int = 2,
    max_objects: int = 6,
) -> Scene:
    """Random scene of `min_objects`..`max_objects` objects with limited overlap.

    Positions are rejection-sampled so that bounding circles overlap by at most ~5% of the sum of
    radii; an object that finds no place after 100 tries is dropped (never below `min_objects`,
    which always fit on a 160x120 canvas).
    """
    bg, bg_rgb, noise, noise_seed = _background(rng)
    n = rng.randint(min_objects, max_objects)
    objects: list[Obj] = []
    for i in range(n):
        size = rng.choice(OBJECT_SIZES)
        r = rng.uniform(*RADIUS[size])
        for _ in range(100):
            x = rng.uniform(r + 2, width - r - 2)
            y = rng.uniform(r + 2, height - r - 2)
            if all(math.hypot(x - o.x, y - o.y) >= 0.95 * (r + o.radius) + 2 for o in objects):
                objects.append(sample_object(rng, x, y, size=size, radius=r))
                break
        else:
            if i < min_objects:  # pragma: no cover - cannot happen for 2 objects on 160x120
                raise RuntimeError("could not place the minimum number of objects")
    return Scene(width, height, bg, bg_rgb, tuple(objects), noise, noise_seed)


def single_object_scene(
    rng: random.Random, shape: str, color: str, width: int = 160, height: int = 120
) -> Scene:
    """One dominant, roughly centred object (zero-shot classification images)."""
    bg, bg_rgb, noise, noise_seed = _background(rng)
    r = rng.uniform(0.25, 0.38) * min(width, height)
    x = width / 2 + rng.uniform(-0.12, 0.12) * width
    y = height / 2 + rng.uniform(-0.1, 0.1) * height
    obj = sample_object(rng, x, y, shape=shape, color=color, size="large", radius=r)
    return Scene(width, height, bg, bg_rgb, (obj,), noise, noise_seed)
