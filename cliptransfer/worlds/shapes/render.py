"""PIL rendering of a `Scene`, optionally through a `View` (a window of the canvas).

A `View` maps a rectangle of canvas pixels onto an output image, so the same function renders a
whole 160x120 scene today and, later, the 36 views of a navigation viewpoint (one window per
heading/elevation over a panorama canvas) without touching the scene model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scene import Obj, Scene, outline

JPEG_QUALITY = 90
SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing


@dataclass(frozen=True)
class View:
    """Canvas window (x0, y0)-(x1, y1) shown as an `out_width` x `out_height` image."""

    x0: float
    y0: float
    x1: float
    y1: float
    out_width: int
    out_height: int


def full_view(scene: Scene) -> View:
    return View(0.0, 0.0, float(scene.width), float(scene.height), scene.width, scene.height)


def _striped(obj: Obj, size: tuple[int, int], scale: float) -> Image.Image:
    """Darker diagonal stripes over the object's colour (a patch of `size`)."""
    layer = Image.new("RGB", size, obj.rgb)
    draw = ImageDraw.Draw(layer)
    dark = tuple(int(c * 0.45) for c in obj.rgb)
    # Stripes 6 canvas px apart and 2 px wide: coarse enough to survive downsampling and JPEG.
    step = max(3, int(round(6 * scale)))
    width = max(1, int(round(2 * scale)))
    w, h = size
    for k in range(-h, w, step):
        draw.line([(k, 0), (k + h, h)], fill=dark, width=width)
    return layer


def render(scene: Scene, view: View | None = None) -> Image.Image:
    """Draw `scene` seen through `view` (default: the whole canvas at its own size). RGB image."""
    view = view or full_view(scene)
    s = SUPERSAMPLE
    big = (view.out_width * s, view.out_height * s)
    sx = big[0] / (view.x1 - view.x0)
    sy = big[1] / (view.y1 - view.y0)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return ((x - view.x0) * sx, (y - view.y0) * sy)

    img = Image.new("RGB", big, scene.background_rgb)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.bbox
        if x2 < view.x0 or x1 > view.x1 or y2 < view.y0 or y1 > view.y1:
            continue  # outside the window
        if obj.shape == "circle":
            (a, b), (c, d) = to_px(x1, y1), to_px(x2, y2)
            geom: list = [a, b, c, d]
        else:
            geom = [to_px(x, y) for x, y in outline(obj)]
        if obj.texture != "striped":
            (draw.ellipse if obj.shape == "circle" else draw.polygon)(geom, fill=obj.rgb)
            continue
        # Striped: paint a stripe patch through a mask of the shape, both cut to the object's box.
        (ax, ay), (bx, by) = to_px(x1, y1), to_px(x2, y2)
        ox, oy = int(ax) - 1, int(ay) - 1
        patch = (int(bx) + 2 - ox, int(by) + 2 - oy)
        if obj.shape == "circle":
            local: list = [geom[0] - ox, geom[1] - oy, geom[2] - ox, geom[3] - oy]
        else:
            local = [(x - ox, y - oy) for x, y in geom]
        mask = Image.new("L", patch, 0)
        mdraw = ImageDraw.Draw(mask)
        (mdraw.ellipse if obj.shape == "circle" else mdraw.polygon)(local, fill=255)
        img.paste(_striped(obj, patch, sx), (ox, oy), mask)
    img = img.reduce(s) if s > 1 else img  # box filter: anti-aliasing
    if scene.noise > 0:
        # Luminance-only Gaussian noise, like a camera sensor; seeded by the scene.
        rng = np.random.default_rng(scene.noise_seed)
        arr = np.asarray(img, dtype=np.float32)
        noise = rng.standard_normal((*arr.shape[:2], 1), dtype=np.float32) * scene.noise
        img = Image.fromarray(np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8), "RGB")
    return img


def encode_jpeg(img: Image.Image) -> bytes:
    """Deterministic JPEG bytes: fixed quality and subsampling, no EXIF or other metadata."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def save_jpeg(img: Image.Image, path: Path) -> None:
    path.write_bytes(encode_jpeg(img))
