"""The Shapes houses' 3-D renderer: skybox strips in Matterport's layout, ray cast in numpy.

A skybox texel is a direction in the panorama's cube space. `nav.render.render_view` looks the
texel of an output pixel up at l = R^-1 . View^-1 . p (R the pose rotation); working its frame
through, the world direction that pixel should show is w = -R . l: then heading 0 looks along +y
and heading grows to the right (towards +x), positive elevation looks up, and `state.rgb` row 0
is the top of the scene (glReadPixels' bottom-first rows of a frame whose GL y axis points down
the world), as MatterSim's pictures are upright. With Matterport-like poses (the camera's y axis
on world -z) strip face 0 is the ceiling and face 5 the floor, as in Matterport's skyboxes.
So each texel's ray leaves the camera along w = -R . l and takes the colour of the nearest of:
floor, ceiling, walls (shaded per room type), and the painted landmarks.
"""

from __future__ import annotations

import math

import numpy as np

from cliptransfer.nav.render import FACE_OF_TARGET
from cliptransfer.worlds.houses.layout import ROOM_SIZE, ROOM_TYPES, WALL_HEIGHT, House, Landmark
from cliptransfer.worlds.shapes.scene import COLORS

__all__ = ["CEILING", "cube_directions", "pose_matrix", "render_skybox", "shape_mask"]

CEILING = (236, 234, 226)
# A Matterport-like camera frame: the camera's x east, its y down (-z), its z north, before yaw.
_R0 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def pose_matrix(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    """(4, 4) camera-to-world pose: Rz(yaw) . R0 and the camera position."""
    c, s = math.cos(yaw), math.sin(yaw)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    pose = np.eye(4)
    pose[:3, :3] = rz @ _R0
    pose[:3, 3] = (x, y, z)
    return pose


def cube_directions(n: int) -> np.ndarray:
    """(6, n, n, 3) cube-space direction of each texel centre, strip face order, rows top-down:
    the inverse of OpenGL's (sc, tc, ma) face table that `nav.render.sample_cubemap` applies."""
    c = (np.arange(n) + 0.5) / n * 2 - 1
    tc, sc = np.meshgrid(c, c, indexing="ij")  # texel row -> t, column -> s
    one = np.ones_like(sc)
    by_target = [
        (one, -tc, -sc),  # +X
        (-one, -tc, sc),  # -X
        (sc, one, tc),  # +Y
        (sc, -one, -tc),  # -Y
        (sc, -tc, one),  # +Z
        (-sc, -tc, -one),  # -Z
    ]
    out = np.empty((6, n, n, 3))
    for target, face in enumerate(FACE_OF_TARGET):
        out[face] = np.stack(by_target[target], -1)
    return out


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    ang = np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang) - 0.08], -1)


_POLYGONS = {"star": _star(), "triangle": np.array([[0.0, 1.0], [-0.95, -0.7], [0.95, -0.7]])}


def _in_polygon(a: np.ndarray, b: np.ndarray, poly: np.ndarray) -> np.ndarray:
    inside = np.zeros(a.shape, bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (y0 > b) != (y1 > b)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (b - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (a < x_at)
    return inside


def shape_mask(shape: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether the point (a, b) (radius units; a right, b up) lies inside the upright shape."""
    if shape == "circle":
        return a * a + b * b <= 1.0
    if shape == "square":
        return np.maximum(abs(a), abs(b)) <= 0.82
    if shape == "diamond":
        return abs(a) + abs(b) <= 1.0
    if shape == "cross":
        return ((abs(a) <= 0.3) & (abs(b) <= 0.92)) | ((abs(b) <= 0.3) & (abs(a) <= 0.92))
    if shape in _POLYGONS:
        return _in_polygon(a, b, _POLYGONS[shape])
    raise ValueError(f"unknown landmark shape {shape!r}")


def _landmark_hits(m: Landmark, o: np.ndarray, d: np.ndarray, best: np.ndarray, rgb: np.ndarray):
    denom = d[:, 0] * m.nx + d[:, 1] * m.ny  # rays must come from the room side (d . n < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((m.x - o[0]) * m.nx + (m.y - o[1]) * m.ny) / denom
    ok = (denom < -1e-9) & (t > 0) & (t < best)
    if not ok.any():
        return
    idx = np.flatnonzero(ok)
    p = o + t[idx, None] * d[idx]
    a = ((p[:, 0] - m.x) * m.ux + (p[:, 1] - m.y) * m.uy) / m.radius
    b = (p[:, 2] - m.z) / m.radius
    near = (abs(a) <= 1.0) & (abs(b) <= 1.0)
    inside = np.zeros(len(idx), bool)
    inside[near] = shape_mask(m.shape, a[near], b[near])
    idx, a, b = idx[inside], a[inside], b[inside]
    colour = np.array(COLORS[m.color], float)
    c = np.broadcast_to(colour, (len(idx), 3)).copy()
    if m.striped:  # darker diagonal stripes, as the Shapes images draw them
        dark = np.floor((a + b) * 2.5) % 2 == 0
        c[dark] *= 0.55
    best[idx] = t[idx]
    rgb[idx] = c


def trace(house: House, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """(M, 3) float RGB of the nearest surface along each ray `dirs` (M, 3) from `origin`."""
    o, d = np.asarray(origin, float), dirs
    m = len(d)
    best = np.full(m, np.inf)
    rgb = np.zeros((m, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(d[:, 2] < 0, -o[2] / d[:, 2], np.inf)
        t_ceil = np.where(d[:, 2] > 0, (WALL_HEIGHT - o[2]) / d[:, 2], np.inf)
    floor = t_floor < t_ceil
    best = np.where(floor, t_floor, t_ceil)
    rgb[~floor] = CEILING
    # Floor: the room's colour in 0.5 m tiles, so motion and distance read from the ground.
    fi = np.flatnonzero(floor)
    p = o + best[fi, None] * d[fi]
    cols = len({r.col for r in house.rooms})
    cell = np.clip(np.floor(p[:, 1] / ROOM_SIZE), 0, len(house.rooms) // cols - 1) * cols
    cell += np.clip(np.floor(p[:, 0] / ROOM_SIZE), 0, cols - 1)
    floors = np.array([ROOM_TYPES[r.kind]["floor"] for r in house.rooms], float)
    tile = (np.floor(p[:, 0] * 2) + np.floor(p[:, 1] * 2)) % 2
    rgb[fi] = floors[cell.astype(int)] * (0.92 + 0.08 * tile[:, None])

    walls_rgb = {i: np.array(ROOM_TYPES[r.kind]["wall"], float) for i, r in enumerate(house.rooms)}
    for w in house.walls:
        ex, ey = w.x1 - w.x0, w.y1 - w.y0
        den = d[:, 0] * ey - d[:, 1] * ex
        qx, qy = w.x0 - o[0], w.y0 - o[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (qx * ey - qy * ex) / den
            s = (qx * d[:, 1] - qy * d[:, 0]) / den
        hit = (np.abs(den) > 1e-12) & (t > 1e-6) & (t < best) & (s >= 0) & (s <= 1)
        if not hit.any():
            continue
        # The side the camera is on: left of p0 -> p1 when the cross product is positive.
        side = w.left if (ex * (o[1] - w.y0) - ey * (o[0] - w.x0)) > 0 else w.right
        length = math.hypot(ex, ey)
        shade = 0.82 + 0.18 * abs(ey / length)  # walls facing east-west a little brighter
        best[hit] = t[hit]
        rgb[hit] = walls_rgb.get(side, np.array(CEILING, float)) * shade
    for m in house.landmarks:
        _landmark_hits(m, o, d, best, rgb)
    return rgb


def render_skybox(house: House, vp_index: int, n: int, supersample: int = 2) -> np.ndarray:
    """(n, 6n, 3) uint8 RGB strip `[face0 | ... | face5]` of one viewpoint (Matterport's
    `<vp>_skybox_small.jpg` layout), each texel the mean of supersample^2 rays."""
    vp = house.viewpoints[vp_index]
    pose = pose_matrix(vp.x, vp.y, vp.z, vp.yaw)
    k = supersample
    local = cube_directions(n * k)  # (6, nk, nk, 3)
    world = -local.reshape(-1, 3) @ pose[:3, :3].T  # w = -R . l
    rgb = trace(house, pose[:3, 3], world).reshape(6, n, k, n, k, 3).mean(axis=(2, 4))
    faces = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.concatenate(list(faces), axis=1)
