"""Paths through a house and the instruction plans that describe them.

A path is a shortest path of the navigation graph (R2R's rule: 4-7 viewpoints, 5-20 m). Its plan
is built from what an agent walking it would see: the path is cut into legs at the turns; a leg
is described by the landmark it heads for ("walk toward the red star") or passes ("walk past the
blue circle"), the turn that starts it ("turn left", "turn left at the striped square" when a
landmark marks the corner) and the room it enters; the end by the landmark beside the goal or
the goal's room. Turn words are relative to the walker's heading, and the first move's turn to
the episode's start heading, so following the plan needs the start heading, the turns and,
above all, the landmarks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cliptransfer.nav.graph import NavGraph
from cliptransfer.worlds.houses.instructions import Ref, Step
from cliptransfer.worlds.houses.layout import House, Landmark, landmark_visible, wrap_angle

__all__ = ["PathSpec", "landmark_ref", "plan_path", "sample_paths", "turn_direction"]

STRAIGHT_DEG = 35.0  # heading changes below this are "straight on"
AROUND_DEG = 145.0
LEG_DEG = 50.0
TOWARD_DEG = 28.0  # a leg heads for a landmark within this bearing of its direction


@dataclass(frozen=True)
class PathSpec:
    path: list[str]
    heading: float
    distance: float


def sample_paths(graph: NavGraph, rng: random.Random, count: int, *, min_vps: int = 4,
                 max_vps: int = 7, min_m: float = 5.0, max_m: float = 20.0,
                 exclude: set[tuple[str, str]] | None = None) -> list[PathSpec]:  # fmt: skip
    """`count` distinct (start, goal) shortest paths within R2R's limits (fewer if the house has
    fewer), start headings uniform in [0, 2 pi)."""
    vps = [v for v in graph.viewpoints if graph.included[v]]
    pairs = []
    for a in vps:
        for b, d in graph.distances_from(a).items():
            if b != a and min_m <= d <= max_m and (a, b) not in (exclude or set()):
                n = len(graph.shortest_path(a, b))
                if min_vps <= n <= max_vps:
                    pairs.append((a, b))
    rng.shuffle(pairs)
    out = []
    for a, b in pairs[:count]:
        out.append(PathSpec(graph.shortest_path(a, b), rng.uniform(0, 2 * math.pi),
                            graph.distance(a, b)))  # fmt: skip
    return out


def turn_direction(delta: float) -> str | None:
    """None (straight on), 'left', 'right' or 'around' for a heading change in radians
    (positive = clockwise seen from above = to the right, MatterSim's heading sense)."""
    deg = math.degrees(abs(wrap_angle(delta)))
    if deg < STRAIGHT_DEG:
        return None
    if deg > AROUND_DEG:
        return "around"
    return "right" if wrap_angle(delta) > 0 else "left"


def landmark_ref(house: House, m: Landmark, rng: random.Random) -> Ref:
    """A referring expression unique in the house: colour + shape, or one of them alone when
    that is unique too; 'striped' mentioned most of the time when it applies."""
    others = [o for o in house.landmarks if o is not m]
    options = [Ref(m.shape, m.color, False)]
    if all(o.color != m.color for o in others):
        options.append(Ref(None, m.color, False))
    if all(o.shape != m.shape for o in others):
        options.append(Ref(m.shape, None, False))
    ref = rng.choice(options)
    if m.striped and rng.random() < 0.7:
        ref = Ref(ref.shape, ref.color, True)
    return ref


def _room(house: House, graph: NavGraph, vp: str, next_vp: str | None) -> int:
    p = graph.position(vp)
    room = house.room_at(float(p[0]), float(p[1]))
    if room < 0 or _is_door(house, p):
        q = graph.position(next_vp) if next_vp else p
        room = house.room_at(float(q[0]), float(q[1]))
    return room


def _is_door(house: House, p) -> bool:
    return any(math.hypot(p[0] - x, p[1] - y) < 1e-6 for _, _, x, y in house.doors)


def plan_path(house: House, graph: NavGraph, spec: PathSpec, rng: random.Random) -> list[Step]:
    """The instruction plan of one path (see the module docstring)."""
    pos = [graph.position(v) for v in spec.path]
    moves = [math.atan2(b[0] - a[0], b[1] - a[1]) for a, b in zip(pos, pos[1:], strict=False)]
    # Legs: runs of moves without a turn between them; (first move index, last move index).
    # A move starts a new leg when it leaves the leg's first direction by more than LEG_DEG, so
    # the small zigzags of a jittered graph stay one "walk toward ..." as a person would say.
    legs, start = [], 0
    for i in range(1, len(moves)):
        if abs(wrap_angle(moves[i] - moves[start])) > math.radians(LEG_DEG):
            legs.append((start, i - 1))
            start = i
    legs.append((start, len(moves) - 1))
    plan: list[Step] = []
    heading, room = spec.heading, _room(house, graph, spec.path[0], spec.path[1])
    named: set[int] = set()
    last_passed: tuple[int, Landmark] | None = None
    for first, last in legs:
        turn = turn_direction(moves[first] - heading)
        a, b = pos[first], pos[last + 1]
        if turn is not None:
            corner = _near_landmark(house, a, 2.0, named)
            if corner is not None and first > 0:
                plan.append(Step("turn_at", ref=landmark_ref(house, corner, rng), direction=turn))
                named.add(id(corner))
            else:
                plan.append(Step("turn", direction=turn))
        target = _ahead(house, a, b, moves[first], named)
        if target is not None:
            plan.append(Step("walk_toward", ref=landmark_ref(house, target, rng)))
            named.add(id(target))
        else:
            passed = _near_landmark(house, (a + b) / 2, 2.5, named)
            if passed is not None:
                plan.append(Step("walk_past", ref=landmark_ref(house, passed, rng)))
                named.add(id(passed))
                last_passed = (len(plan) - 1, passed)
            elif turn is None or rng.random() < 0.5:
                plan.append(Step("go_straight"))
        nxt = spec.path[last + 2] if last + 2 < len(spec.path) else None
        new_room = _room(house, graph, spec.path[last + 1], nxt)
        if new_room != room and new_room >= 0 and (last + 1 < len(moves) or rng.random() < 0.5):
            plan.append(Step("enter", room=house.rooms[new_room].kind))
        room, heading = new_room, moves[last]
    goal = pos[-1]
    near = _near_landmark(house, goal, 2.6, set())
    if near is not None:
        if last_passed is not None and last_passed[1] is near:  # not "walk past X, stop at X"
            k = last_passed[0]
            plan[k] = Step("walk_toward", ref=plan[k].ref)
        plan.append(Step("stop_near", ref=landmark_ref(house, near, rng)))
    else:
        plan.append(Step("stop_in", room=house.rooms[room].kind))
    return plan


def _near_landmark(house: House, p, radius: float, named: set[int]) -> Landmark | None:
    best, best_d = None, radius
    for m in house.landmarks:
        d = math.hypot(m.x - p[0], m.y - p[1])
        if (
            d < best_d
            and id(m) not in named
            and landmark_visible(house, float(p[0]), float(p[1]), m)
        ):
            best, best_d = m, d
    return best


def _ahead(house: House, a, b, direction: float, named: set[int]) -> Landmark | None:
    """The landmark the leg a -> b walks toward: visible from a, within TOWARD_DEG of the leg's
    direction and not nearer than the leg's end."""
    leg = math.hypot(b[0] - a[0], b[1] - a[1])
    best, best_off = None, math.radians(TOWARD_DEG)
    for m in house.landmarks:
        if id(m) in named or not landmark_visible(house, float(a[0]), float(a[1]), m):
            continue
        bearing = math.atan2(m.x - a[0], m.y - a[1])
        off = abs(wrap_angle(bearing - direction))
        if off < best_off and math.hypot(m.x - a[0], m.y - a[1]) >= leg - 0.5:
            best, best_off = m, off
    return best
