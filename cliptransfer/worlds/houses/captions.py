"""Captions of house views, for teaching a contrastive model the house domain: the room type and
the landmarks in the frame with where they are (left / ahead / right), from the geometry."""

from __future__ import annotations

import math
import random

from cliptransfer.worlds.houses.layout import House, Landmark, landmark_visible, wrap_angle

__all__ = ["HALF_HFOV", "room_in_view", "view_caption", "visible_landmarks"]

# The R2R camera (640 x 480, vertical FOV 60 deg): half the horizontal field of view.
HALF_HFOV = math.atan(math.tan(math.radians(30)) * 4 / 3)
_MARGIN = math.radians(6)  # a landmark must be this far inside the frame to be named
_CENTRE = math.radians(12)


def visible_landmarks(house: House, vp_index: int, heading: float) -> list[tuple[Landmark, float]]:
    """(landmark, bearing relative to `heading`) of the landmarks in a horizon view, nearest
    first."""
    vp = house.viewpoints[vp_index]
    out = []
    for m in house.landmarks:
        if not landmark_visible(house, vp.x, vp.y, m):
            continue
        rel = wrap_angle(math.atan2(m.x - vp.x, m.y - vp.y) - heading)
        if abs(rel) < HALF_HFOV - _MARGIN:
            out.append((math.hypot(m.x - vp.x, m.y - vp.y), m, rel))
    return [(m, rel) for _, m, rel in sorted(out, key=lambda t: t[0])]


def _phrase(m: Landmark) -> str:
    words = ("striped " if m.striped else "") + f"{m.color} {m.shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _where(rel: float) -> str:
    if abs(rel) < _CENTRE:
        return "ahead"
    return "on the right" if rel > 0 else "on the left"


def room_in_view(house: House, vp_index: int, heading: float) -> str:
    vp = house.viewpoints[vp_index]
    room = house.room_at(vp.x + 0.5 * math.sin(heading), vp.y + 0.5 * math.cos(heading))
    return house.rooms[room].kind if room >= 0 else house.rooms[0].kind


def view_caption(house: House, vp_index: int, heading: float, rng: random.Random) -> str:
    """'the kitchen with a red star on the left and a striped blue circle ahead'."""
    room = room_in_view(house, vp_index, heading)
    seen = visible_landmarks(house, vp_index, heading)[:3]
    if not seen:
        return rng.choice([f"a view of the {room}", f"the walls of the {room}",
                           f"an empty corner of the {room}"])  # fmt: skip
    parts = [f"{_phrase(m)} {_where(rel)}" for m, rel in seen]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return rng.choice([f"the {room} with {listed}", f"a view of the {room}: {listed}",
                       f"{listed} in the {room}"])  # fmt: skip
