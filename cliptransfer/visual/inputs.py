"""Image side of the V&L heads: grid cells or regions -> (B, N, C) features, mask, spatial boxes.

Every head takes `features (B, N, C)`, `mask (B, N)` (True = a real cell/region) and optionally
`spatial (B, N, 4)`: the box of each cell/region as normalised [x1, y1, x2, y2] in [0, 1]. Grid
cells get the box of their cell, regions their detector box divided by the image size, so grids
and BottomUp regions are interchangeable. Regions vary in number per image (10-100 adaptive in
BUTD), hence the padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PixelInputs",
    "StoreInputs",
    "collate_visual",
    "grid_boxes",
    "grid_inputs",
    "normalize_boxes",
    "pad_visual",
]


def grid_boxes(h: int, w: int) -> torch.Tensor:
    """(h*w, 4) normalised [x1, y1, x2, y2] of each cell, row-major like `flatten(2)` of (H, W)."""
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    boxes = torch.stack([x / w, y / h, (x + 1) / w, (y + 1) / h], dim=-1)
    return boxes.reshape(h * w, 4)


def normalize_boxes(boxes: torch.Tensor, image_w: float, image_h: float) -> torch.Tensor:
    """Pixel boxes (N, 4) [x1, y1, x2, y2] -> divided by the image size, clamped to [0, 1]."""
    scale = torch.tensor([image_w, image_h, image_w, image_h], dtype=torch.float32)
    return (boxes.float() / scale).clamp(0.0, 1.0)


def pad_visual(
    features: list[torch.Tensor], spatial: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad per-image (N_i, C) features to (B, N_max, C) with zeros; mask (B, N_max) True = real."""
    n_max = max(f.shape[0] for f in features)
    B, C = len(features), features[0].shape[1]
    if all(f.shape[0] == n_max for f in features):  # grids: one copy, nothing to pad
        mask = torch.ones(B, n_max, dtype=torch.bool)
        sp = torch.stack(spatial).to(features[0].dtype) if spatial is not None else None
        return torch.stack(features), mask, sp
    out = features[0].new_zeros(B, n_max, C)
    mask = torch.zeros(B, n_max, dtype=torch.bool)
    sp = features[0].new_zeros(B, n_max, 4) if spatial is not None else None
    for i, f in enumerate(features):
        n = f.shape[0]
        out[i, :n] = f
        mask[i, :n] = True
        if sp is not None:
            sp[i, :n] = spatial[i]
    return out, mask, sp


def grid_inputs(features: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, H*W) all True and spatial (B, H*W, 4) for a dense grid from the backbone."""
    B, N, _ = features.shape
    mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
    spatial = grid_boxes(*hw).to(features.device, features.dtype).expand(B, N, 4)
    return mask, spatial


def collate_visual(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The image side of a batch: stacked `pixels`, or padded `features` + `visual_mask` +
    `spatial`."""
    if "pixels" in items[0]:
        return {"pixels": torch.stack([it["pixels"] for it in items])}
    feats, mask, spatial = pad_visual(
        [it["features"] for it in items], [it["spatial"] for it in items]
    )
    return {"features": feats, "visual_mask": mask, "spatial": spatial}


class StoreInputs:
    """`image_id -> {"features": (N, C), "spatial": (N, 4)}` from a FeatureStore (grid or regions).

    `max_regions` keeps the first N regions of region records (BUTD orders them by detector
    confidence); None keeps all.
    """

    def __init__(self, store: Any, max_regions: int | None = None) -> None:
        self.store, self.max_regions = store, max_regions
        self.kind = store.metadata["kind"]
        # Each image is checked for non-finite values once, not once per question and epoch
        # (the check cost a third of a VQA batch's loading time).
        self._finite: set[str] = set()
        self.channels = int(store.metadata["channels"])
        if self.kind == "grid":
            self._grid = grid_boxes(*store.metadata["grid_size"])

    def __call__(self, image_id: int | str) -> dict[str, torch.Tensor]:
        key = str(image_id)
        rec = self.store[key]
        feats = rec["features"]  # (N, C)
        if key not in self._finite:  # NaN would poison every loss
            self._check_finite(image_id, feats)
            self._finite.add(key)
        if self.kind == "grid":
            return {"features": feats, "spatial": self._grid}
        w, h = rec["image_w"], rec["image_h"]
        if not w or not h:
            raise ValueError(
                f"feature store {self.store.root}: image {image_id} has no image size, needed to "
                "normalise its boxes"
            )
        spatial = normalize_boxes(rec["boxes"], w, h)
        if self.max_regions is not None:
            feats, spatial = feats[: self.max_regions], spatial[: self.max_regions]
        return {"features": feats, "spatial": spatial}

    def _check_finite(self, image_id: int | str, feats: torch.Tensor) -> None:
        if not torch.isfinite(feats).all():
            bad = (~torch.isfinite(feats)).any(-1).nonzero().flatten().tolist()
            raise ValueError(
                f"feature store {self.store.root}: image {image_id} has non-finite features "
                f"(rows {bad[:8]}{' ...' if len(bad) > 8 else ''}); re-extract it or drop the id"
            )


class PixelInputs:
    """`image_id -> {"pixels": (3, H, W)}`: the image resized to `size` exactly and normalised
    as in grid extraction (`features.extract.preprocess`), so end-to-end sees what the store saw.
    """

    def __init__(self, paths: Mapping[int | str, str | Path], size: tuple[int, int]) -> None:
        self.paths, self.size = dict(paths), tuple(size)

    def __call__(self, image_id: int | str) -> dict[str, torch.Tensor]:
        from cliptransfer.contrastive.pairs import open_image
        from cliptransfer.visual.extract import ImageReadError, preprocess

        path = self.paths[image_id]
        try:
            img = open_image(str(path))
        except Exception as e:
            raise ImageReadError(f"{path} (image {image_id}): cannot decode image: {e}") from e
        return {"pixels": preprocess(img, self.size)}
