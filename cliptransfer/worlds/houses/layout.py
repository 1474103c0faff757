"""Floor plans of the Shapes houses: rooms on a grid, walls with doorways, landmarks painted on
walls, and a Matterport-like navigation graph (viewpoints ~2 m apart, degree ~4, symmetric
`unobstructed`, `visible` = line of sight). Pure data and 2-D geometry; `raycast.py` draws it.

Coordinates are Matterport's: metres, x east, y north, z up; heading 0 looks along +y and grows
towards +x (MatterSim's convention), so a landmark's heading from a viewpoint is atan2(dx, dy).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from cliptransfer.worlds.shapes.scene import COLORS, SHAPES

__all__ = ["House", "Landmark", "Room", "Viewpoint", "Wall", "landmark_visible", "sample_house",
           "segment_blocked", "wrap_angle"]  # fmt: skip

ROOM_SIZE = 6.0  # metres per grid cell
WALL_HEIGHT = 2.6
DOOR_WIDTH = 1.3
LANDMARK_RADIUS = 0.6  # half extent of a painted shape, metres
LANDMARK_HEIGHT = 1.35  # centre above the floor
CAMERA_HEIGHT = 1.5
SEE_DISTANCE = 9.0  # metres: landmarks further away are neither named nor captioned
# Room types: wall and floor colours are fixed per type, so a room can be recognised by sight.
ROOM_TYPES: dict[str, dict[str, tuple[int, int, int]]] = {
    "kitchen": {"wall": (226, 214, 150), "floor": (150, 150, 150)},
    "bedroom": {"wall": (150, 180, 220), "floor": (120, 84, 60)},
    "bathroom": {"wall": (170, 215, 205), "floor": (215, 215, 215)},
    "living room": {"wall": (220, 170, 150), "floor": (150, 105, 60)},
    "hallway": {"wall": (190, 190, 190), "floor": (95, 80, 70)},
    "office": {"wall": (175, 205, 160), "floor": (70, 90, 120)},
}


@dataclass(frozen=True)
class Room:
    kind: str
    row: int
    col: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        x0, y0 = self.col * ROOM_SIZE, self.row * ROOM_SIZE
        return x0, y0, x0 + ROOM_SIZE, y0 + ROOM_SIZE


@dataclass(frozen=True)
class Wall:
    """A vertical wall segment from (x0, y0) to (x1, y1); `left` / `right` are the room numbers
    on each side looking from p0 to p1 (-1 = outside)."""

    x0: float
    y0: float
    x1: float
    y1: float
    left: int
    right: int


@dataclass(frozen=True)
class Landmark:
    shape: str
    color: str
    striped: bool
    room: int
    x: float  # centre on the wall, metres
    y: float
    z: float
    # Unit vector along the wall (the painted shape's horizontal axis) and into the room.
    ux: float
    uy: float
    nx: float
    ny: float
    radius: float = LANDMARK_RADIUS


@dataclass
class Viewpoint:
    id: str
    x: float
    y: float
    z: float  # camera height above the world origin (floor at 0)
    height: float  # camera height above the floor, Matterport's `height`
    yaw: float  # rotation of the panorama about z (Matterport poses are not aligned)
    room: int  # -1 for a doorway viewpoint
    included: bool = True


@dataclass
class House:
    scan: str
    rooms: list[Room]
    walls: list[Wall]
    doors: list[tuple[int, int, float, float]]  # (room a, room b, x, y of the doorway centre)
    landmarks: list[Landmark]
    viewpoints: list[Viewpoint]
    edges: set[tuple[int, int]] = field(default_factory=set)  # viewpoint index pairs, i < j

    def room_at(self, x: float, y: float) -> int:
        for i, r in enumerate(self.rooms):
            x0, y0, x1, y1 = r.bounds
            if x0 <= x < x1 and y0 <= y < y1:
                return i
        return -1


def _cross(ax: float, ay: float, bx: float, by: float) -> float:
    return ax * by - ay * bx


def segment_blocked(walls: list[Wall], ax: float, ay: float, bx: float, by: float) -> bool:
    """Whether the open segment a-b crosses a wall (touching an end point does not count)."""
    dx, dy = bx - ax, by - ay
    for w in walls:
        ex, ey = w.x1 - w.x0, w.y1 - w.y0
        den = _cross(dx, dy, ex, ey)
        if abs(den) < 1e-12:
            continue
        t = _cross(w.x0 - ax, w.y0 - ay, ex, ey) / den
        s = _cross(w.x0 - ax, w.y0 - ay, dx, dy) / den
        if 1e-9 < t < 1 - 1e-9 and -1e-9 <= s <= 1 + 1e-9:
            return True
    return False


def wrap_angle(a: float) -> float:
    """a in [-pi, pi)."""
    return (a + math.pi) % (2 * math.pi) - math.pi


def landmark_visible(house: House, x: float, y: float, m: Landmark) -> bool:
    """Seen from (x, y): in front of its wall (it faces into its room), within SEE_DISTANCE,
    nothing in between."""
    if (x - m.x) * m.nx + (y - m.y) * m.ny <= 0.2:
        return False
    if math.hypot(m.x - x, m.y - y) > SEE_DISTANCE:
        return False
    return not segment_blocked(house.walls, x, y, m.x + 0.05 * m.nx, m.y + 0.05 * m.ny)


def _hex_id(rng: random.Random, n: int = 32) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def scan_id(rng: random.Random) -> str:
    """An 11-character id like Matterport's scan ids (e.g. 'D7N2EKCX4Sj')."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789"
    return "".join(rng.choice(alphabet) for _ in range(11))


def _doors(rows: int, cols: int, rng: random.Random, extra: float) -> set[tuple[int, int]]:
    """Adjacent room pairs joined by a door: a random spanning tree plus some extra doors."""
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    pairs = [((r, c), (r + dr, c + dc)) for r, c in cells for dr, dc in ((0, 1), (1, 0))
             if r + dr < rows and c + dc < cols]  # fmt: skip
    rng.shuffle(pairs)
    parent = {c: c for c in cells}

    def find(c):
        while parent[c] != c:
            c = parent[c]
        return c

    chosen = set()
    for a, b in pairs:
        if find(a) != find(b):
            parent[find(a)] = find(b)
            chosen.add((a, b))
        elif rng.random() < extra:
            chosen.add((a, b))
    return {(a[0] * cols + a[1], b[0] * cols + b[1]) for a, b in chosen}


def _walls(rows: int, cols: int, doors: dict[tuple[int, int], float]) -> list[Wall]:
    """Every grid boundary; a door splits its boundary into two segments around the gap."""
    walls = []
    s = ROOM_SIZE
    for r in range(rows + 1):  # horizontal boundaries y = r * s, cells below (r-1) and above (r)
        for c in range(cols):
            below = (r - 1) * cols + c if r > 0 else -1
            above = r * cols + c if r < rows else -1
            # Looking from west to east, +y (above) is on the left.
            key = (below, above)
            walls += _split(c * s, r * s, (c + 1) * s, r * s, above, below, doors.get(key))
    for c in range(cols + 1):  # vertical boundaries x = c * s
        for r in range(rows):
            west = r * cols + c - 1 if c > 0 else -1
            east = r * cols + c if c < cols else -1
            # Looking from south to north, west is on the left.
            walls += _split(c * s, r * s, c * s, (r + 1) * s, west, east, doors.get((west, east)))
    return walls


def _split(x0, y0, x1, y1, left, right, door: float | None) -> list[Wall]:
    if door is None:
        return [Wall(x0, y0, x1, y1, left, right)]
    length = math.hypot(x1 - x0, y1 - y0)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    a, b = door - DOOR_WIDTH / 2, door + DOOR_WIDTH / 2
    return [
        Wall(x0, y0, x0 + ux * a, y0 + uy * a, left, right),
        Wall(x0 + ux * b, y0 + uy * b, x1, y1, left, right),
    ]


def _landmarks(rng, rooms, walls, door_xy, per_room: tuple[int, int]) -> list[Landmark]:
    """Shapes painted on the inner faces of each room's walls; (shape, colour) unique per house,
    away from doorways and from each other."""
    combos = [(s, c) for s in SHAPES for c in COLORS]
    rng.shuffle(combos)
    out: list[Landmark] = []
    for i, room in enumerate(rooms):
        x0, y0, x1, y1 = room.bounds
        # The four inner faces: (start corner, direction along the wall, normal into the room).
        faces = [((x0, y0), (1.0, 0.0), (0.0, 1.0)), ((x0, y1), (1.0, 0.0), (0.0, -1.0)),
                 ((x0, y0), (0.0, 1.0), (1.0, 0.0)), ((x1, y0), (0.0, 1.0), (-1.0, 0.0))]  # fmt: skip
        n = rng.randint(*per_room)
        tries = 0
        placed = 0
        while placed < n and tries < 200 and combos:
            tries += 1
            (sx, sy), (ax, ay), (nx, ny) = rng.choice(faces)
            f = rng.uniform(0.15, 0.85) * ROOM_SIZE
            x, y = sx + f * ax, sy + f * ay
            ux, uy = -ny, nx  # the shape's "right" for a viewer facing the wall
            if any(math.hypot(x - dx, y - dy) < DOOR_WIDTH for dx, dy in door_xy):
                continue
            if any(math.hypot(x - m.x, y - m.y) < 1.6 for m in out):
                continue
            shape, color = combos.pop()
            striped = rng.random() < 0.3
            # 1 cm off the wall, into the room, so the painted shape is in front of the wall.
            out.append(Landmark(shape, color, striped, i, x + 0.01 * nx, y + 0.01 * ny,
                                LANDMARK_HEIGHT, ux, uy, nx, ny))  # fmt: skip
            placed += 1
    return out


def _viewpoints(rng, rooms, doors_xy, house_rng_ids) -> list[Viewpoint]:
    vps = []
    for i, room in enumerate(rooms):
        x0, y0, _, _ = room.bounds
        for gy in (1.0, 3.0, 5.0):
            for gx in (1.0, 3.0, 5.0):
                if rng.random() < 0.15:
                    continue
                x = x0 + gx + rng.uniform(-0.35, 0.35)
                y = y0 + gy + rng.uniform(-0.35, 0.35)
                vps.append((x, y, i))
    for _a, _b, x, y in doors_xy:
        vps.append((x, y, -1))
    out = []
    for x, y, room in vps:
        height = CAMERA_HEIGHT + rng.uniform(-0.06, 0.06)
        out.append(Viewpoint(_hex_id(house_rng_ids), x, y, height, height,
                             rng.uniform(0, 2 * math.pi), room))  # fmt: skip
    return out


def _edges(vps: list[Viewpoint], walls: list[Wall], rng: random.Random) -> set[tuple[int, int]]:
    """Matterport-like: near pairs in line of sight; 2 m grid neighbours always, diagonals at
    random, a doorway joined to the nearest viewpoints on both sides."""
    edges = set()
    for i, a in enumerate(vps):
        for j in range(i + 1, len(vps)):
            b = vps[j]
            d = math.hypot(a.x - b.x, a.y - b.y)
            if segment_blocked(walls, a.x, a.y, b.x, b.y):
                continue
            door = a.room < 0 or b.room < 0
            if d < 2.45 or (not door and d < 3.3 and rng.random() < 0.6):
                edges.add((i, j))
            elif door and d < 2.8:
                edges.add((i, j))
    return edges


def _connected(n: int, edges: set[tuple[int, int]]) -> bool:
    adj: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen, stack = {0}, [0]
    while stack:
        for u in adj[stack.pop()]:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return len(seen) == n


def sample_house(rng: random.Random, rows: int, cols: int) -> House:
    """One house of rows x cols rooms (room types distinct while there are enough)."""
    for _attempt in range(20):
        house = _try_house(rng, rows, cols)
        if house is not None:
            return house
    raise RuntimeError("could not sample a connected house in 20 attempts")


def _try_house(rng: random.Random, rows: int, cols: int) -> House | None:
    scan = scan_id(rng)
    kinds = list(ROOM_TYPES)
    rng.shuffle(kinds)
    rooms = [Room(kinds[k % len(kinds)], k // cols, k % cols) for k in range(rows * cols)]
    door_pairs = _doors(rows, cols, rng, extra=0.3)
    doors: dict[tuple[int, int], float] = {}
    doors_xy = []
    for a, b in sorted(door_pairs):
        offset = rng.uniform(1.5, ROOM_SIZE - 1.5)  # along the boundary, from its start
        doors[(a, b)] = offset
        ra, rb = rooms[a], rooms[b]
        if ra.row == rb.row:  # east-west neighbours: vertical boundary x = rb.col * s
            x, y = rb.col * ROOM_SIZE, ra.row * ROOM_SIZE + offset
        else:
            x, y = ra.col * ROOM_SIZE + offset, rb.row * ROOM_SIZE
        doors_xy.append((a, b, x, y))
    walls = _walls(rows, cols, doors)
    landmarks = _landmarks(rng, rooms, walls, [(x, y) for _, _, x, y in doors_xy], (2, 3))
    vps = _viewpoints(rng, rooms, doors_xy, rng)
    edges = _edges(vps, walls, rng)
    if not _connected(len(vps), edges):
        return None
    return House(scan, rooms, walls, [(a, b, x, y) for a, b, x, y in doors_xy], landmarks,
                 vps, edges)  # fmt: skip
