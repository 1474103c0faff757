"""A small BottomUp detector analogue: CNN backbone + RoIAlign + object and attribute heads.

Mirrors the parts of the BUTD Faster R-CNN (peteanderson80/bottom-up-attention, ResNet-101 C4)
that shape its features, at CPU size:
- a conv backbone to stride 8 (BUTD: res2-res4, stride 16), run once per image;
- RoIAlign of each box to 7x7 (BUTD: 14x14), then a strided "res5" conv stage and a mean pool:
  the (R, D) output is the `pool5_flat` feature written to the TSV (post-ReLU, non-negative);
- an object classifier over `__background__` + the object labels (index 0 is background, as in
  BUTD's `objects_vocab` order) and an attribute head fed the feature concatenated with an
  embedding of the object class (ground truth in training, predicted at test), one softmax per
  attribute group (colour, size, texture) instead of VG's single 400-way attribute softmax.
Training is Fast R-CNN style on ground-truth boxes: per image, GT boxes and jittered copies with
IoU >= 0.5 are foreground, random and near-object boxes with IoU < 0.3 are background.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.ops import Conv2dNormActivation, roi_align

from cliptransfer.fileio import atomic_save_dir, read_json, write_json
from cliptransfer.worlds.shapes.boxes import box_iou_np, clip_boxes, jitter_boxes, random_boxes

__all__ = [
    "BACKGROUND",
    "ObjectImage",
    "RegionModelConfig",
    "RegionNet",
    "RegionTrainConfig",
    "box_iou_np",
    "clip_boxes",
    "evaluate_region_model",
    "jitter_boxes",
    "load_images",
    "load_region_model",
    "sample_rois",
    "save_region_model",
    "train_region_model",
]

BACKGROUND = "__background__"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# ImageNet statistics, as timm's backbones expect; the exact values only need to be fixed.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass
class RegionModelConfig:
    labels: list[str]  # object classes, without background
    attribute_groups: dict[str, list[str]]  # {"colour": [...], "size": [...], "texture": [...]}
    dim: int = 256  # pool5_flat width (BUTD: 2048)
    widths: tuple[int, int, int] = (32, 64, 96)  # backbone: stride 4, 4, 8 (see RegionNet)
    head_width: int = 128  # the res5 analogue's 3x3 conv, before the 1x1 up to `dim`
    pool: int = 7  # RoIAlign output size
    class_embed: int = 64
    attr_hidden: int = 256

    stride = 8  # of the backbone's output; fixed by the architecture

    @property
    def classes(self) -> list[str]:
        return [BACKGROUND, *self.labels]


@dataclass
class RegionTrainConfig:
    steps: int = 300
    batch_images: int = 8
    rois_per_image: int = 32  # BUTD: 64 per image, FG_FRACTION 0.5
    fg_fraction: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 20
    attr_weight: float = 1.0
    flip: bool = True  # BUTD trains on flipped copies too
    max_images: int | None = None  # first N training images only (tests)
    fg_iou: float = 0.5
    bg_iou: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in config.json


@dataclass
class ObjectImage:
    """One image's labelled objects: boxes (G, 4) px x1,y1,x2,y2, labels (G,), attrs (G, A)."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray  # indices into RegionModelConfig.labels (no background offset)
    attrs: np.ndarray  # per group, indices into that group's values


def sample_rois(
    image: ObjectImage, rng: np.random.Generator, cfg: RegionTrainConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast R-CNN minibatch of one image -> rois (R, 4), classes (R,) with 0 = background,
    attrs (R, A) with -1 on background rows. GT boxes always come first."""
    w, h, gt = image.width, image.height, image.boxes.astype(np.float64)
    n_fg = max(len(gt), round(cfg.rois_per_image * cfg.fg_fraction))
    fg, fg_gt = gt, np.arange(len(gt))
    if len(gt):
        cand = clip_boxes(jitter_boxes(rng, gt, 8, 0.15), w, h)
        iou = box_iou_np(cand, gt)
        pos = rng.permutation(np.flatnonzero(iou.max(1) >= cfg.fg_iou))[: n_fg - len(gt)]
        fg = np.concatenate([gt, cand[pos]])
        fg_gt = np.concatenate([fg_gt, iou[pos].argmax(1)])  # the best-overlapping object
    # Backgrounds: boxes anywhere, and boxes pushed off the objects (hard, part-like negatives).
    n_bg = cfg.rois_per_image - len(fg)
    bg = np.zeros((0, 4))
    for _ in range(8):  # a few tries: crowded scenes reject many candidates
        near = jitter_boxes(rng, gt, 4, 0.6) if len(gt) else np.zeros((0, 4))
        c = clip_boxes(
            np.concatenate([random_boxes(rng, 4 * cfg.rois_per_image, w, h), near]), w, h
        )
        c = c[(c[:, 2] - c[:, 0] >= 2) & (c[:, 3] - c[:, 1] >= 2)]
        if len(gt):
            c = c[box_iou_np(c, gt).max(1) < cfg.bg_iou]
        bg = np.concatenate([bg, rng.permutation(c)])
        if len(bg) >= n_bg:
            break
    bg = bg[:n_bg]
    rois = np.concatenate([fg, bg]).astype(np.float32)
    classes = np.concatenate([image.labels[fg_gt] + 1, np.zeros(len(bg), np.int64)])
    attrs = np.concatenate([image.attrs[fg_gt], -np.ones((len(bg), image.attrs.shape[1]))])
    return rois, classes.astype(np.int64), attrs.astype(np.int64)


class RegionNet(nn.Module):
    """Backbone + RoIAlign + res5-like head -> pool5 features, object and attribute logits."""

    def __init__(self, cfg: RegionModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w0, w1, w2 = cfg.widths
        # A patchify stem keeps full-resolution maps out of the net: the CPU budget goes to
        # depth at stride 4-8. Receptive field at the output: 36 px, about the largest object.
        self.backbone = nn.Sequential(
            Conv2dNormActivation(3, w0, 4, stride=4, padding=0),  # (B, w0, H/4, W/4)
            Conv2dNormActivation(w0, w0, 3),
            Conv2dNormActivation(w0, w1, 3, stride=2),  # (B, w1, H/8, W/8)
            Conv2dNormActivation(w1, w2, 3),
        )
        # res5 analogue on the pooled RoI (BUTD: res5 with stride 2 on 14x14, then average pool).
        self.res5 = nn.Sequential(
            Conv2dNormActivation(w2, cfg.head_width, 3, stride=2),  # (R, head, 4, 4)
            Conv2dNormActivation(cfg.head_width, cfg.dim, 1),  # (R, D, 4, 4)
        )
        self.cls_score = nn.Linear(cfg.dim, len(cfg.classes))
        self.cls_embed = nn.Embedding(len(cfg.classes), cfg.class_embed)
        self.attr_fc = nn.Linear(cfg.dim + cfg.class_embed, cfg.attr_hidden)
        n_attr = sum(len(v) for v in cfg.attribute_groups.values())
        self.attr_score = nn.Linear(cfg.attr_hidden, n_attr)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, C, H/stride, W/stride)."""
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.backbone(x)

    def pool5(self, fmap: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """rois (R, 5) = batch index, x1, y1, x2, y2 in pixels -> pool5_flat (R, D)."""
        pooled = roi_align(fmap, rois, self.cfg.pool, 1.0 / self.cfg.stride, 2, aligned=True)
        return self.res5(pooled).mean((2, 3))  # (R, D, 4, 4) -> (R, D)

    def attr_logits(self, feats: torch.Tensor, classes: torch.Tensor) -> list[torch.Tensor]:
        """One (R, n_values) tensor per attribute group, given each RoI's object class."""
        h = F.relu(self.attr_fc(torch.cat([feats, self.cls_embed(classes)], 1)))
        sizes = [len(v) for v in self.cfg.attribute_groups.values()]
        return list(self.attr_score(h).split(sizes, 1))

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, Any]:
        """Test-time pass: features, class probabilities and attribute probabilities (attributes
        conditioned on the most likely non-background class, as BUTD's test net does)."""
        feats = self.pool5(self.feature_map(images), rois)
        cls_prob = self.cls_score(feats).softmax(1)  # (R, 1 + C)
        pred = cls_prob[:, 1:].argmax(1) + 1
        attrs = [a.softmax(1) for a in self.attr_logits(feats, pred)]
        return {"features": feats, "cls_prob": cls_prob, "attr_prob": attrs}


def load_images(data: Sequence[ObjectImage]) -> torch.Tensor:
    """Decode the images of `data` -> uint8 (N, 3, H, W); each must have its recorded size (boxes
    are in its pixels) and, to batch, the same size as the others."""
    from PIL import Image

    arrays = []
    for d in data:
        try:
            with Image.open(d.path) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise OSError(f"cannot read image {d.path} (image_id {d.image_id}): {e}") from e
        if arrays[-1].shape[:2] != (d.height, d.width):
            h, w = arrays[-1].shape[:2]
            raise ValueError(
                f"{d.path} (image_id {d.image_id}) is {w}x{h}, but its record says "
                f"{d.width}x{d.height}"
            )
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(f"{d.path} differs in size from {data[0].path}: cannot batch them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _lr_at(step: int, cfg: RegionTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def train_region_model(
    data: Sequence[ObjectImage],
    model_cfg: RegionModelConfig,
    cfg: RegionTrainConfig,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[RegionNet, dict[str, Any]]:
    """Train from scratch, deterministically for a seed; returns the model (eval mode) and a
    history {"loss": [...per step...], "seconds": ...}."""
    if not data:
        raise ValueError("no training images with objects")
    data = list(data)[: cfg.max_images] if cfg.max_images else list(data)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = RegionNet(model_cfg)
    images = load_images(data)  # (N, 3, H, W) uint8, ~115 MB for small
    decay = [p for p in model.parameters() if p.ndim > 1]  # no decay on norms and biases
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        weight_decay=0.0,
    )
    order_rng = _rng(seed, 1)
    order: list[int] = []
    history: dict[str, Any] = {"loss": [], "cls_loss": [], "attr_loss": []}
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        while len(order) < cfg.batch_images:  # epochs of shuffled images, drawn in turn
            order += order_rng.permutation(len(data)).tolist()
        idx, order = order[: cfg.batch_images], order[cfg.batch_images :]
        batch, rois, classes, attrs = [], [], [], []
        for b, i in enumerate(idx):
            rng = _rng(seed, 2, step, i)
            r, c, a = sample_rois(data[i], rng, cfg)
            img = images[i]
            if cfg.flip and rng.random() < 0.5:
                img = img.flip(-1)
                r = np.stack(
                    [data[i].width - r[:, 2], r[:, 1], data[i].width - r[:, 0], r[:, 3]], 1
                )
            batch.append(img)
            rois.append(np.concatenate([np.full((len(r), 1), b, np.float32), r], 1))
            classes.append(c)
            attrs.append(a)
        rois_t = torch.from_numpy(np.concatenate(rois).astype(np.float32))  # (R, 5)
        cls_t = torch.from_numpy(np.concatenate(classes))
        attr_t = torch.from_numpy(np.concatenate(attrs))
        feats = model.pool5(model.feature_map(torch.stack(batch)), rois_t)
        cls_loss = F.cross_entropy(model.cls_score(feats), cls_t)
        fg = cls_t > 0
        attr_loss = feats.sum() * 0.0  # stays 0 for a batch without objects
        if fg.any():
            logits = model.attr_logits(feats[fg], cls_t[fg])
            attr_loss = sum(F.cross_entropy(x, attr_t[fg, g]) for g, x in enumerate(logits))
            attr_loss = attr_loss / len(logits)
        loss = cls_loss + cfg.attr_weight * attr_loss
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(round(loss.item(), 6))
        history["cls_loss"].append(round(cls_loss.item(), 6))
        history["attr_loss"].append(round(attr_loss.item(), 6))
        if log and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"region model step {step + 1}/{cfg.steps} loss {history['loss'][-1]:.4f}")
    history["seconds"] = round(time.perf_counter() - start, 2)
    history["images"] = len(data)
    return model.eval(), history


@torch.inference_mode()
def evaluate_region_model(
    model: RegionNet, data: Sequence[ObjectImage], *, seed: int = 0, batch_images: int = 32
) -> dict[str, Any]:
    """Accuracy on ground-truth object boxes: object class (background counts as wrong), each
    attribute group (conditioned on the predicted class); plus the share of random background
    boxes (IoU < 0.3 with every object) classified as background."""
    model.eval()
    n_groups = len(model.cfg.attribute_groups)
    obj_right, attr_right, bg_right = 0, np.zeros(n_groups), 0
    n_obj = n_bg = 0
    for s in range(0, len(data), batch_images):
        chunk = list(data[s : s + batch_images])
        images = load_images(chunk)
        rois, n_gt = [], []
        for b, d in enumerate(chunk):
            bg = random_boxes(_rng(seed, 3, s + b), 8, d.width, d.height)
            bg = clip_boxes(bg, d.width, d.height)
            if len(d.boxes):
                bg = bg[box_iou_np(bg, d.boxes).max(1) < 0.3]
            r = np.concatenate([d.boxes, bg]).astype(np.float32)
            rois.append(np.concatenate([np.full((len(r), 1), b, np.float32), r], 1))
            n_gt.append(len(d.boxes))
        out = model(images, torch.from_numpy(np.concatenate(rois)))
        pred = out["cls_prob"].argmax(1).numpy()
        attr_pred = [a.argmax(1).numpy() for a in out["attr_prob"]]
        offset = 0
        for d, k, r in zip(chunk, n_gt, rois):
            sl = slice(offset, offset + k)
            obj_right += int((pred[sl] == d.labels + 1).sum())
            for g in range(n_groups):
                attr_right[g] += int((attr_pred[g][sl] == d.attrs[:, g]).sum())
            bg_right += int((pred[offset + k : offset + len(r)] == 0).sum())
            n_obj, n_bg = n_obj + k, n_bg + len(r) - k
            offset += len(r)
    names = list(model.cfg.attribute_groups)
    return {
        "objects": n_obj,
        "object_accuracy": round(obj_right / max(n_obj, 1), 4),
        "attribute_accuracy": {
            n: round(float(v) / max(n_obj, 1), 4) for n, v in zip(names, attr_right)
        },
        "background_boxes": n_bg,
        "background_accuracy": round(bg_right / max(n_bg, 1), 4),
        "chance_object_accuracy": round(1 / len(model.cfg.labels), 4),
    }


def save_region_model(
    model: RegionNet, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write model.safetensors + config.json into `path` (atomically, as one folder)."""
    cfg = {"model": asdict(model.cfg), **(extra or {})}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        write_json(tmp / CONFIG_NAME, cfg, indent=1, sort_keys=True)

    return atomic_save_dir(write, path)


def load_region_model(path: str | Path) -> tuple[RegionNet, dict[str, Any]]:
    """(model in eval mode, the saved config dict) from a folder written by save_region_model."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"region model folder {path} has no {name}")
    saved = read_json(path / CONFIG_NAME)
    try:
        mcfg = dict(saved["model"])
        mcfg["widths"] = tuple(mcfg["widths"])
        model = RegionNet(RegionModelConfig(**mcfg))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path / CONFIG_NAME}: not a region model config ({e})") from e
    state = load_file(str(path / WEIGHTS_NAME))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path / WEIGHTS_NAME} does not fit its config.json: {e}") from e
    return model.eval(), saved
