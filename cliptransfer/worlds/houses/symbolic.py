"""Symbolic view features of the Shapes houses: what each of a viewpoint's 36 views shows, read
from the floor plan instead of the pixels. They are the perception ceiling of the navigation
task: an agent on them sees every landmark's colour and shape and every room without error, so
its margin over the no-vision agent bounds what any image encoder can add.

Channels of a view (69; `SYMBOLIC_CHANNELS` names them):
    0-5    room in view (one-hot, the room half a metre ahead, as the view captions name it)
    6-13   colours of the landmarks in the frame     } each landmark adds its weight:
    14-19  shapes of the landmarks in the frame      } (1 - distance / 9 m), at least 0.2,
    20     striped landmarks in the frame            } halved off the horizon row
    21-68  colour x shape of the landmarks in the frame (colour-major)
A landmark is in the frame when it is visible from the viewpoint (`landmark_visible`) and its
bearing is within the R2R camera's half horizontal field of view of the view's heading.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cliptransfer.fileio import write_json
from cliptransfer.nav.view_features import NUM_VIEWS, view_key
from cliptransfer.nav.views import view_angles
from cliptransfer.visual.store import FeatureStore
from cliptransfer.worlds.houses.captions import HALF_HFOV, room_in_view
from cliptransfer.worlds.houses.instructions import COLORS, ROOM_TYPES, SHAPES
from cliptransfer.worlds.houses.layout import SEE_DISTANCE, House, landmark_visible, wrap_angle
from cliptransfer.worlds.houses.world import sample_houses
from cliptransfer.worlds.prepare import prepare_atomically

__all__ = ["SYMBOLIC_CHANNELS", "SYMBOLIC_VERSION", "prepare_symbolic_views",
           "symbolic_view_features"]  # fmt: skip

SYMBOLIC_VERSION = 1
SYMBOLIC_CHANNELS = (
    [f"room:{r}" for r in ROOM_TYPES] + [f"color:{c}" for c in COLORS]
    + [f"shape:{s}" for s in SHAPES] + ["striped"]
    + [f"{c} {s}" for c in COLORS for s in SHAPES]
)  # fmt: skip
_COLOR0, _SHAPE0 = len(ROOM_TYPES), len(ROOM_TYPES) + len(COLORS)
_STRIPED = _SHAPE0 + len(SHAPES)
_PAIR0 = _STRIPED + 1
_OFF_HORIZON = 0.5  # a landmark (1.35 m high) sits at the edge of the +-30 deg rows' frames
_MIN_WEIGHT = 0.2


def symbolic_view_features(house: House, vp_index: int) -> np.ndarray:
    """(36, 69) float32: the channels above for each view, in MatterSim's view order."""
    vp = house.viewpoints[vp_index]
    seen = []  # (bearing, weight, landmark) of every landmark visible from here
    for m in house.landmarks:
        if landmark_visible(house, vp.x, vp.y, m):
            distance = math.hypot(m.x - vp.x, m.y - vp.y)
            weight = max(_MIN_WEIGHT, 1.0 - distance / SEE_DISTANCE)
            seen.append((math.atan2(m.x - vp.x, m.y - vp.y), weight, m))
    out = np.zeros((NUM_VIEWS, len(SYMBOLIC_CHANNELS)), np.float32)
    for ix in range(NUM_VIEWS):
        heading, elevation = view_angles(ix)
        out[ix, ROOM_TYPES.index(room_in_view(house, vp_index, heading))] = 1.0
        row_weight = 1.0 if elevation == 0.0 else _OFF_HORIZON
        for bearing, weight, m in seen:
            if abs(wrap_angle(bearing - heading)) >= HALF_HFOV:
                continue
            w = weight * row_weight
            c, s = COLORS.index(m.color), SHAPES.index(m.shape)
            out[ix, _COLOR0 + c] += w
            out[ix, _SHAPE0 + s] += w
            out[ix, _STRIPED] += w * m.striped
            out[ix, _PAIR0 + c * len(SHAPES) + s] += w
    return out


def prepare_symbolic_views(out: str | Path, size: str, seed: int) -> Path:
    """A "views" store of the symbolic features of every viewpoint of the houses preset
    (`size`, `seed`), written atomically once (a no-op when `out` already holds it)."""
    identity = {"size": size, "seed": seed, "version": SYMBOLIC_VERSION}

    def write(tmp: Path) -> None:
        meta = {"kind": "views", "views": NUM_VIEWS, "channels": len(SYMBOLIC_CHANNELS),
                "dtype": "float32", "camera": {"width": 640, "height": 480, "vfov_deg": 60.0},
                "feature": "symbolic_floor_plan"}  # fmt: skip
        writer = FeatureStore.create(tmp, meta)
        try:
            for house in sample_houses(size, seed):
                for i, vp in enumerate(house.viewpoints):
                    writer.add(view_key(house.scan, vp.id), symbolic_view_features(house, i))
        finally:
            writer.close()
        write_json(tmp / "manifest.json", {"generator": __name__, **identity})  # last

    return prepare_atomically(out, __name__, identity, write, what="symbolic views store")
