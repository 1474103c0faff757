"""Box geometry of the BottomUp detector analogue: IoU, clipping, jittered / random boxes, RPN-like
proposals and BUTD's box selection (per-class NMS, confidence threshold, min/max boxes)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.ops import nms

if TYPE_CHECKING:
    from cliptransfer.worlds.shapes.region_model import ObjectImage

__all__ = [
    "NMS_THRESH",
    "box_iou_np",
    "clip_boxes",
    "jitter_boxes",
    "make_proposals",
    "random_boxes",
    "select_boxes",
]

NMS_THRESH = 0.3  # cfg.TEST.NMS


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) and (M, 4) boxes in continuous coordinates -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip to [0, w-1] x [0, h-1], Faster R-CNN's `clip_boxes` (BUTD boxes stay inside)."""
    out = boxes.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width - 1)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height - 1)
    return out


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    # Sides 6-60 px, log-uniform, so small and large backgrounds are both common.
    w = np.exp(rng.uniform(math.log(6), math.log(60), n))
    h = w * np.exp(rng.uniform(-0.5, 0.5, n))
    x1 = rng.uniform(0, 1, n) * np.maximum(width - w, 1)
    y1 = rng.uniform(0, 1, n) * np.maximum(height - h, 1)
    return np.stack([x1, y1, x1 + w, y1 + h], 1)


def jitter_boxes(rng: np.random.Generator, boxes: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """k copies of each box: centre shifted by N(0, sigma*side), sides scaled by exp(N(0, sigma))
    -> (len(boxes) * k, 4), grouped by box."""
    b = np.repeat(boxes, k, axis=0)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + rng.normal(0, sigma, len(b)) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + rng.normal(0, sigma, len(b)) * h
    w = w * np.exp(rng.normal(0, sigma, len(b)))
    h = h * np.exp(rng.normal(0, sigma, len(b)))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def make_proposals(image: ObjectImage, rng: np.random.Generator, n: int = 100) -> np.ndarray:
    """(n, 4) float32 proposals, like an RPN's: per object 4 tight and 4 loose jittered boxes and
    2 part boxes, then background boxes; clipped, at least 2 px a side, in shuffled order."""
    w, h, gt = image.width, image.height, image.boxes.astype(np.float64)
    if w < 3 or h < 3:
        raise ValueError(f"{image.path}: {w}x{h} is too small for region proposals")
    parts = []
    if len(gt):
        # A part: 40-70% of the object's width or height, anchored at a random side.
        p = np.repeat(gt, 2, axis=0)
        frac = rng.uniform(0.4, 0.7, len(p))
        side = rng.integers(0, 4, len(p))  # 0 left, 1 top, 2 right, 3 bottom
        bw, bh = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
        p[side == 0, 2] = p[side == 0, 0] + frac[side == 0] * bw[side == 0]
        p[side == 1, 3] = p[side == 1, 1] + frac[side == 1] * bh[side == 1]
        p[side == 2, 0] = p[side == 2, 2] - frac[side == 2] * bw[side == 2]
        p[side == 3, 1] = p[side == 3, 3] - frac[side == 3] * bh[side == 3]
        parts = [jitter_boxes(rng, gt, 4, 0.05), jitter_boxes(rng, gt, 4, 0.15), p]
    boxes = np.concatenate(parts) if parts else np.zeros((0, 4))
    while True:  # backgrounds: anywhere, or pushed off an object
        near = jitter_boxes(rng, gt, 2, 0.6) if len(gt) else np.zeros((0, 4))
        side = np.exp(rng.uniform(np.log(6), np.log(60), (n, 1))) * [1, 1]
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([w, h] - side, 1)
        boxes = np.concatenate([boxes, near, np.concatenate([xy, xy + side], 1)])
        boxes = clip_boxes(boxes, w, h)
        boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)]
        if len(boxes) >= n:
            break
    return boxes[rng.permutation(len(boxes))[:n]].astype(np.float32)


def select_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    conf_thresh: float,
    min_boxes: int,
    max_boxes: int,
    nms_thresh: float = NMS_THRESH,
) -> np.ndarray:
    """generate_tsv.py's box selection: scores (P, 1 + C), column 0 background -> kept indices.

    max_conf = each box's best score among the classes whose NMS it survives; keep max_conf >=
    conf_thresh in proposal order, else (too few / too many) the top min_boxes / max_boxes by
    max_conf, ties by the raw best class score, then index.
    """
    boxes_t = torch.from_numpy(np.ascontiguousarray(boxes, np.float32))
    max_conf = np.zeros(len(boxes))
    for c in range(1, scores.shape[1]):
        s = scores[:, c]
        keep = nms(boxes_t, torch.from_numpy(s.astype(np.float32)), nms_thresh).numpy()
        max_conf[keep] = np.where(s[keep] > max_conf[keep], s[keep], max_conf[keep])
    keep_boxes = np.flatnonzero(max_conf >= conf_thresh)
    if min_boxes <= len(keep_boxes) <= max_boxes:
        return keep_boxes
    order = np.lexsort((np.arange(len(boxes)), -scores[:, 1:].max(1), -max_conf))
    return order[: min_boxes if len(keep_boxes) < min_boxes else max_boxes]
