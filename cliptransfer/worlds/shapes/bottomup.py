"""BottomUp (BUTD) region features for the Shapes world, made the way BUTD made them.

    summary = build_bottomup_features(world, "out/bottomup", boxes="adaptive")
    for rec in iter_regions("out/bottomup/val2014.tsv"): ...

1. A small detector analogue (region_model.py) is trained on the train2014 objects (classes +
   colour/size/texture attributes) and saved as safetensors + config.json.
2. Per image, "RPN" proposals = jittered copies of the object boxes, part boxes and background
   boxes (the world's boxes stand in for a trained RPN). The classifier scores them and the
   selection mirrors bottom-up-attention tools/generate_tsv.py `get_detections_from_im`: per
   non-background class NMS (cfg.TEST.NMS = 0.3) records each box's best surviving class score
   as max_conf; boxes with max_conf >= conf_thresh are kept in proposal order; fewer than
   min_boxes or more than max_boxes -> the top ones by max_conf. Adaptive = conf_thresh 0.2,
   10-100 boxes; fixed36 = conf_thresh 0.4 (generate_tsv.py's default), exactly 36.
   Deviation: generate_tsv.py breaks max_conf ties (every NMS-suppressed box has 0) by
   np.argsort's unstable order; here ties go to the higher raw class score, so the padding of
   36-box files really is "the next best", and the order is the same on every machine.
3. Features are the RoIAlign + res5 + mean-pool output of the kept boxes (BUTD's pool5_flat), and
   boxes are the proposals themselves (BUTD writes the RoIs, not the regressed boxes), clipped to
   [0, w-1] x [0, h-1]. Files are BUTD TSV (image_id, image_w, image_h, num_boxes, boxes,
   features) with the integer COCO / Flickr ids, so `iter_regions`/`import_regions` read them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliptransfer.fileio import JSONFileError, read_json, write_json
from cliptransfer.visual.region_import import write_tsv
from cliptransfer.worlds.shapes.boxes import NMS_THRESH, box_iou_np, make_proposals, select_boxes
from cliptransfer.worlds.shapes.scene import COLORS, OBJECT_SIZES, TEXTURES

from .region_model import (
    ObjectImage,
    RegionModelConfig,
    RegionNet,
    RegionTrainConfig,
    evaluate_region_model,
    load_images,
    load_region_model,
    save_region_model,
    train_region_model,
)

__all__ = [
    "BOX_MODES",
    "ObjectsFormatError",
    "SPLIT_IMAGES",
    "bottomup_dir",
    "box_features",
    "build_bottomup_features",
    "detect_regions",
    "load_objects",
    "make_proposals",
    "region_model",
    "select_boxes",
]

VERSION = 1
# split -> image folder, relative to the world root (objects/{split}.json lists the files).
SPLIT_IMAGES = {
    "train2014": "images/train2014",
    "val2014": "images/val2014",
    "flickr30k": "flickr30k_images",
}
ATTRIBUTE_GROUPS = {"colour": list(COLORS), "size": list(OBJECT_SIZES), "texture": list(TEXTURES)}
# generate_tsv.py settings: (conf_thresh, MIN_BOXES, MAX_BOXES).
BOX_MODES = {"adaptive": (0.2, 10, 100), "fixed36": (0.4, 36, 36)}


class ObjectsFormatError(ValueError):
    """An objects/{split}.json file that does not follow the Shapes objects format."""


def load_objects(world: str | Path, split: str) -> tuple[list[ObjectImage], list[str]]:
    """Images of objects/{split}.json with their boxes, label and attribute indices -> (images,
    labels). Attribute indices follow ATTRIBUTE_GROUPS (colour, size, texture)."""
    if split not in SPLIT_IMAGES:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_IMAGES)}")
    path = Path(world) / "objects" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a Shapes world (make one with `cliptransfer prepare shapes`)"
        )
    try:
        doc = read_json(path)
    except JSONFileError as e:
        raise ObjectsFormatError(str(e)) from e
    try:
        labels, records = list(doc["labels"]), doc["images"]
    except (KeyError, TypeError) as e:
        raise ObjectsFormatError(f"{path}: expected {{labels, attributes, images}} ({e})") from e
    label_idx = {name: i for i, name in enumerate(labels)}
    groups = list(ATTRIBUTE_GROUPS.values())
    images = []
    for k, rec in enumerate(records):
        image_id = rec.get("image_id") if isinstance(rec, dict) else "?"
        where = f"{path}: images[{k}] (image_id {image_id})"
        try:
            objs = rec["objects"]
            boxes = np.array([o["bbox"] for o in objs], np.float32).reshape(-1, 4)
            lab = np.array([label_idx[o["label"]] for o in objs], np.int64)
            if any(len(o["attributes"]) != len(groups) for o in objs):
                raise ValueError(f"attributes must be [{', '.join(ATTRIBUTE_GROUPS)}]")
            att = np.array(
                [[g.index(v) for g, v in zip(groups, o["attributes"])] for o in objs], np.int64
            ).reshape(-1, len(groups))
            image = ObjectImage(
                int(rec["image_id"]),
                Path(world) / SPLIT_IMAGES[split] / rec["file_name"],
                int(rec["width"]),
                int(rec["height"]),
                boxes,
                lab,
                att,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ObjectsFormatError(f"{where}: bad record ({type(e).__name__}: {e})") from e
        if len(boxes) and not (
            (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        ):
            raise ObjectsFormatError(f"{where}: a bbox is not [x1, y1, x2, y2] with x1<x2, y1<y2")
        if not image.path.is_file():
            raise FileNotFoundError(f"{where}: image file {image.path} not found")
        images.append(image)
    return images, labels


def _seed(*keys: Any) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@torch.inference_mode()
def box_features(
    model: RegionNet, images: torch.Tensor, boxes: Sequence[np.ndarray]
) -> list[dict[str, np.ndarray]]:
    """pool5 features and class probabilities of given boxes (BUTD's "extract features for given
    boxes"): images uint8 (B, 3, H, W), boxes[b] (N_b, 4) px -> per image {features (N_b, D),
    cls_prob (N_b, 1 + C)}."""
    rois = np.concatenate(
        [
            np.concatenate([np.full((len(b), 1), i), np.asarray(b).reshape(-1, 4)], 1)
            for i, b in enumerate(boxes)
        ]
    ).astype(np.float32)
    out = model(images, torch.from_numpy(rois))  # (R, D), (R, 1 + C)
    feats, probs = out["features"].numpy(), out["cls_prob"].numpy().astype(np.float64)
    ends = np.cumsum([len(b) for b in boxes])
    return [
        {"features": f, "cls_prob": p}
        for f, p in zip(np.split(feats, ends[:-1]), np.split(probs, ends[:-1]))
    ]


def detect_regions(
    model: RegionNet,
    data: Sequence[ObjectImage],
    *,
    boxes: str = "adaptive",
    seed: int = 0,
    split: str = "",
    proposals: int = 100,
    score_jitter: float = 0.05,
    batch_images: int = 16,
) -> Iterator[dict[str, Any]]:
    """BUTD records {image_id, image_w, image_h, boxes (N, 4), features (N, D)} per image."""
    if boxes not in BOX_MODES:
        raise ValueError(f"boxes must be one of {list(BOX_MODES)}, got {boxes!r}")
    conf_thresh, min_boxes, max_boxes = BOX_MODES[boxes]
    if proposals < min_boxes:
        raise ValueError(f"{proposals} proposals cannot give {min_boxes} boxes ({boxes})")
    for s in range(0, len(data), batch_images):
        chunk = list(data[s : s + batch_images])
        props = [
            make_proposals(d, _seed("proposals", seed, split, d.image_id), proposals) for d in chunk
        ]
        outs = box_features(model, load_images(chunk), props)
        for d, prop, out in zip(chunk, props, outs):
            # A detector's scores are noisier than our clean classifier's: jitter them.
            rng = _seed("scores", seed, split, d.image_id)
            scores = np.clip(
                out["cls_prob"] + rng.normal(0, score_jitter, out["cls_prob"].shape), 0, 1
            )
            keep = select_boxes(
                prop, scores, conf_thresh=conf_thresh, min_boxes=min_boxes, max_boxes=max_boxes
            )
            yield {
                "image_id": str(d.image_id),
                "image_w": d.width,
                "image_h": d.height,
                "boxes": prop[keep],
                "features": out["features"][keep],
            }


def _world_identity(world: Path) -> dict[str, Any]:
    path = world / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {world} is not a (complete) Shapes world; make one with "
            "`cliptransfer prepare shapes`"
        )
    manifest = read_json(path)
    return {k: manifest.get(k) for k in ("generator", "version", "size", "seed")}


def _box_stats(counts: list[int], found: int, objects: int) -> dict[str, Any]:
    a = np.array(counts)
    return {
        "images": len(a),
        "total": int(a.sum()),
        "min": int(a.min()),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 3),
        "median": float(np.median(a)),
        "at_min": int((a == a.min()).sum()),
        # share of annotated objects with a kept box at IoU >= 0.5 (a detector's recall)
        "object_recall": round(found / max(objects, 1), 4),
    }


def _model_settings(world: Path, dim: int, seed: int, train: RegionTrainConfig) -> dict[str, Any]:
    return {"version": VERSION, "world": _world_identity(world), "dim": dim, "seed": seed,
            "train": asdict(train)}  # fmt: skip


def bottomup_dir(cache_root: str | Path, boxes: str = "adaptive") -> Path:
    """The folder of a Shapes world's BottomUp features (TSVs, store, detector) under a feature
    cache root: one name for VQA / SNLI-VE's regions and VLN's supervised encoder, so they share
    one detector."""
    return Path(cache_root) / f"bottomup-shapes-{boxes}"


def region_model(
    world: str | Path,
    out_dir: str | Path,
    *,
    dim: int = 256,
    seed: int = 0,
    train: RegionTrainConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The detector analogue of `build_bottomup_features` alone: trained on the world's objects
    (or reused from out_dir/model when trained with the same settings); returns out_dir/model."""
    world, out = Path(world), Path(out_dir)
    train = train or RegionTrainConfig()
    _get_model(world, out, _model_settings(world, dim, seed, train), train, dim, seed, log)
    return out / "model"


def _get_model(
    world: Path,
    out: Path,
    settings: dict[str, Any],
    train: RegionTrainConfig,
    dim: int,
    seed: int,
    log: Callable[[str], None] | None,
) -> tuple[RegionNet, dict[str, Any]]:
    """Load out/model when it was trained with these settings, else train, evaluate and save."""
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        model, saved = load_region_model(model_dir)
        if saved.get("settings") == settings:
            return model, saved
    train_data, labels = load_objects(world, "train2014")
    val_data, val_labels = load_objects(world, "val2014")
    if val_labels != labels:
        raise ValueError(f"{world}/objects: val2014 labels {val_labels} != train2014 {labels}")
    cfg = RegionModelConfig(labels=labels, attribute_groups=ATTRIBUTE_GROUPS, dim=dim)
    model, history = train_region_model(train_data, cfg, train, seed=seed, log=log)
    evaluation = evaluate_region_model(model, val_data, seed=seed)
    if log:
        log(f"region model on val2014 objects: {evaluation}")
    losses = history.pop("loss")
    history.update(first_loss=losses[0], last_loss=float(np.mean(losses[-10:])))
    history = {k: v for k, v in history.items() if k not in ("cls_loss", "attr_loss")}
    extra = {"settings": settings, "history": history, "val2014": evaluation}
    save_region_model(model, model_dir, extra)
    return model, read_json(model_dir / "config.json")


def _write_split(
    path: Path, records: Iterator[dict[str, Any]], data: Sequence[ObjectImage]
) -> dict[str, Any]:
    """Write a BUTD TSV beside `path`, rename it into place once complete and synced; returns
    the box statistics."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    counts, found = [], 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal found
        for rec, d in zip(records, data):  # records come in `data` order
            counts.append(len(rec["boxes"]))
            if len(d.boxes):
                found += int((box_iou_np(d.boxes, rec["boxes"]).max(1) >= 0.5).sum())
            yield rec

    try:
        write_tsv(tmp, counted(), format="butd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _box_stats(counts, found, sum(len(d.boxes) for d in data))


def build_bottomup_features(
    world: str | Path,
    out_dir: str | Path,
    *,
    boxes: str = "adaptive",
    dim: int = 256,
    seed: int = 0,
    splits: Sequence[str] = ("train2014", "val2014", "flickr30k"),
    train: RegionTrainConfig | None = None,
    proposals: int = 100,
    score_jitter: float = 0.05,
    batch_images: int = 16,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) the detector analogue and write out_dir/{split}.tsv (BUTD TSV),
    out_dir/model/ and out_dir/summary.json; returns the summary. Idempotent: splits already
    written with the same settings are skipped, and a finished run returns its summary."""
    world, out = Path(world), Path(out_dir)
    if boxes not in BOX_MODES:
        raise ValueError(f"boxes must be one of {list(BOX_MODES)}, got {boxes!r}")
    unknown = [s for s in splits if s not in SPLIT_IMAGES]
    if unknown or not splits:
        raise ValueError(f"splits {unknown or splits} not in {list(SPLIT_IMAGES)}")
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    train = train or RegionTrainConfig()
    model_settings = _model_settings(world, dim, seed, train)
    conf_thresh, min_boxes, max_boxes = BOX_MODES[boxes]
    settings = {
        **model_settings,
        "boxes": boxes,
        "conf_thresh": conf_thresh,
        "min_boxes": min_boxes,
        "max_boxes": max_boxes,
        "nms": NMS_THRESH,
        "proposals": proposals,
        "score_jitter": score_jitter,
    }
    summary_path = out / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        summary = read_json(summary_path)
        if summary.get("settings") != settings:
            summary = {}  # other settings: everything is remade
    summary.update(settings=settings, splits=summary.get("splits", {}), format="butd")
    done = [s for s in splits if s in summary["splits"] and (out / f"{s}.tsv").is_file()]
    if len(done) == len(splits) and summary.get("model"):
        if log:
            log(f"bottomup features already in {out} ({', '.join(splits)})")
        return summary
    out.mkdir(parents=True, exist_ok=True)
    model, saved = _get_model(world, out, model_settings, train, dim, seed, log)
    summary["model"] = {
        "path": str(out / "model"),
        "history": saved.get("history"),
        "val2014": saved.get("val2014"),
    }
    for split in splits:
        if split in done:
            continue
        data, _ = load_objects(world, split)
        start = time.perf_counter()
        records = detect_regions(
            model,
            data,
            boxes=boxes,
            seed=seed,
            split=split,
            proposals=proposals,
            score_jitter=score_jitter,
            batch_images=batch_images,
        )
        stats = _write_split(out / f"{split}.tsv", records, data)
        summary["splits"][split] = {
            "file": f"{split}.tsv",
            "boxes": stats,
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json(summary_path, summary, indent=1)
        if log:
            log(f"{split}: {len(data)} images -> {out / f'{split}.tsv'} {stats}")
    return summary
