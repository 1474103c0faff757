"""Views of a Matterport skybox without OpenGL, as MatterSim renders them (src/lib/MatterSim.cpp
`renderScene`, NavGraph.cpp `loadCubemapImages`, vertex.sh / fragment.sh).

MatterSim draws a cube around the camera with Model = R (the pose's rotation), View = Rx(-pi/2 +
elevation) . Rz(pi + heading), a perspective of vertical field of view `vfov`, and looks each
fragment up in a cube map at the cube-space vertex position. So the output pixel (row, col) shows
the cube-map texel in direction l = R^-1 . View^-1 . (x_c, y_c, -1) with
x_c = (2 (col + 0.5) / W - 1) tan(vfov / 2) W / H and y_c = (2 (row + 0.5) / H - 1) tan(vfov / 2):
glReadPixels returns the framebuffer's bottom row first and MatterSim does not flip, so row 0
of `state.rgb` is the GL bottom row (y_c < 0). Matterport poses put the camera's y axis on world
-z, which makes that the top of the scene: the pictures come out upright, strip face 0 is the
ceiling (worlds/houses/raycast.py works the frame through: a pixel shows world direction
-R . l). The cube map: GL targets +X, -X, +Y, -Y, +Z, -Z are faces 2, 4, 0, 5,
1, 3 of the `<vp>_skybox_small.jpg` strip, uploaded unflipped (texture row 0 = image row 0),
GL_LINEAR without mipmaps, clamp-to-edge within each face, OpenGL's face selection table.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = [
    "FACE_OF_TARGET",
    "find_skybox",
    "load_skybox",
    "lookup_directions",
    "render_view",
    "sample_cubemap",
]

# strip face of each GL target, in the order +X, -X, +Y, -Y, +Z, -Z
FACE_OF_TARGET = (2, 4, 0, 5, 1, 3)


def find_skybox(root: Path, scan: str, vp: str) -> Path | list[Path] | None:
    """Where a viewpoint's skybox is under a dataset folder: MatterSim's
    `<scan>/matterport_skybox_images/<vp>_skybox_small.jpg` strip (or the strip beside the scan
    folder's other files), else Matterport3D's 6 `<vp>_skybox{k}_sami.jpg` faces; None if absent."""
    for p in (root / scan / "matterport_skybox_images" / f"{vp}_skybox_small.jpg",
              root / scan / f"{vp}_skybox_small.jpg"):  # fmt: skip
        if p.is_file():
            return p
    faces = [
        root / scan / "matterport_skybox_images" / f"{vp}_skybox{k}_sami.jpg" for k in range(6)
    ]
    return faces if all(f.is_file() for f in faces) else None


def load_skybox(skybox: str | Path | np.ndarray | list) -> list[np.ndarray]:
    """The 6 faces (N, N, 3) RGB in strip order, from a `_skybox_small.jpg` strip (path or
    (N, 6N, 3) array) or the 6 `<vp>_skybox{k}_sami.jpg` faces (paths or arrays, k = 0..5)."""
    from PIL import Image

    def rgb(x: str | Path | np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        with Image.open(x) as im:
            return np.asarray(im.convert("RGB"))

    if isinstance(skybox, list | tuple):
        faces = [rgb(f) for f in skybox]
        if len(faces) != 6:
            raise ValueError(f"a skybox has 6 faces, got {len(faces)}")
    else:
        strip = rgb(skybox)
        n = strip.shape[0]
        if strip.ndim != 3 or strip.shape[1] != 6 * n:
            where = skybox if not isinstance(skybox, np.ndarray) else "skybox array"
            raise ValueError(f"{where}: a skybox strip is (N, 6N, 3), got {strip.shape}")
        faces = [strip[:, k * n : (k + 1) * n] for k in range(6)]
    n = faces[0].shape[0]
    if any(f.shape[:2] != (n, n) for f in faces):
        raise ValueError(f"skybox faces must all be N x N, got {[f.shape for f in faces]}")
    return faces


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)


def lookup_directions(pose: np.ndarray | list[float], heading: float, elevation: float,
                      width: int, height: int, vfov: float) -> np.ndarray:  # fmt: skip
    """(H, W, 3) cube-map lookup direction of each output pixel (row 0 = GL's bottom row)."""
    pose = np.asarray(pose, dtype=np.float32).reshape(4, 4)  # MatterSim reads the pose as float
    rot = pose[:3, :3]
    # glm computes in float: the angles are float32 before the trigonometry
    view = _rx(float(np.float32(-math.pi / 2) + np.float32(elevation))) @ _rz(
        float(np.float32(math.pi) + np.float32(heading))
    )
    t = math.tan(vfov / 2)
    xc = (2 * (np.arange(width) + 0.5) / width - 1) * t * width / height
    yc = (2 * (np.arange(height) + 0.5) / height - 1) * t
    d = np.stack(np.broadcast_arrays(xc[None, :], yc[:, None], -np.ones((1, 1))), -1)  # (H, W, 3)
    inv = np.linalg.inv(view.astype(np.float64) @ rot.astype(np.float64))
    return d @ inv.T


def sample_cubemap(faces: list[np.ndarray], dirs: np.ndarray) -> np.ndarray:
    """GL_LINEAR, clamp-to-edge cube-map lookup of `dirs` (..., 3) -> (..., 3) uint8."""
    x, y, z = dirs[..., 0], dirs[..., 1], dirs[..., 2]
    ax, ay, az = np.abs(x), np.abs(y), np.abs(z)
    # OpenGL's major axis; ties go to z, then y (a measure-zero set of directions)
    use_z = (az >= ax) & (az >= ay)
    use_y = ~use_z & (ay >= ax)
    target = np.where(use_z, np.where(z > 0, 4, 5), np.where(use_y, np.where(y > 0, 2, 3),
                                                                np.where(x > 0, 0, 1)))  # fmt: skip
    sc = np.select([target == 0, target == 1, target == 2, target == 3, target == 4],
                   [-z, z, x, x, x], -x)  # fmt: skip
    tc = np.select([target == 2, target == 3], [z, -z], -y)
    ma = np.select([target < 2, target < 4], [ax, ay], az)
    s, t = (sc / ma + 1) / 2, (tc / ma + 1) / 2
    # One flat gather over all pixels from the stacked faces (per-face masks cost 2x as much).
    n = faces[0].shape[0]
    texels = np.stack(faces).astype(np.float64).reshape(-1, 3)  # (6 * N * N, 3)
    base = np.asarray(FACE_OF_TARGET)[target] * (n * n)
    u, v = s * n - 0.5, t * n - 0.5  # texel centres at (k + 0.5) / N
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    c0, c1 = np.clip(u0, 0, n - 1).astype(int), np.clip(u0 + 1, 0, n - 1).astype(int)
    r0 = base + np.clip(v0, 0, n - 1).astype(int) * n
    r1 = base + np.clip(v0 + 1, 0, n - 1).astype(int) * n
    tap = lambda i: np.take(texels, i, axis=0)  # noqa: E731 (take: 5x faster than [i])
    out = ((1 - fu) * (1 - fv) * tap(r0 + c0) + fu * (1 - fv) * tap(r0 + c1)
           + (1 - fu) * fv * tap(r1 + c0) + fu * fv * tap(r1 + c1))  # fmt: skip
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_view(skybox: str | Path | np.ndarray | list, pose: np.ndarray | list[float],
                heading: float, elevation: float, *, width: int = 640, height: int = 480,
                vfov: float = math.radians(60)) -> np.ndarray:  # fmt: skip
    """(height, width, 3) uint8 RGB: what MatterSim's `state.rgb` holds (BGR turned to RGB, its
    row order: row 0 is GL's bottom row, the top of the scene for Matterport-style poses)."""
    faces = load_skybox(skybox)
    return sample_cubemap(faces, lookup_directions(pose, heading, elevation, width, height, vfov))
