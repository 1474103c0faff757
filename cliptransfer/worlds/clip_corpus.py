"""The packaged CLIP's pretraining corpus: Shapes scene captions, Shapes object-region
descriptions, and Shapes-house view captions, as one folder of image-text pairs.

Why region descriptions: trained on the scene captions alone, a CLIP learns colour and background
but not shape. Shape words occur there inside lists of 3-5 objects ("two triangles, a circle and a
square"), so in a batch the image is already picked out by its background and colours; the loss
never needs shape, and the text tower maps every shape word to the same embedding (cosine 0.996
between "a circle." and "a star." in the first packaged asset) while a linear probe on its image
embeddings still reads shape at 40 %. A crop of one object with its own description ("a large
red circle") is the pair in which shape is what tells two same-coloured crops apart: the
Visual-Genome-region / RegionCLIP remedy. The crop windows are the scenes' own BottomUp boxes
(`objects/train2014.json`) with some context; each window is rendered anew from the image's own
scene model at `CROP_PX` (checked against the objects file), so a small object is drawn sharp
instead of a 3-4x upscaled JPEG cut (version 1 cut the JPEG: its blurry small crops taught shapes
at a scale the zero-shot images never show). Only train scenes are used, nothing from the
zero-shot set's generator.

Layout of `out`: `train.jsonl` / `val.jsonl` (records `{"image", "caption", "source"}` with
images relative to `out`), `images/{scenes,regions,houses}/...`, `manifest.json` (counts).
`val.jsonl` is the Shapes world's val pairs, unchanged, so retrieval recall stays comparable to
a CLIP trained on the scenes alone.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

from cliptransfer.fileio import iter_jsonl, read_json
from cliptransfer.worlds.prepare import prepare_atomically
from cliptransfer.worlds.shapes.formats import write_json, write_jsonl
from cliptransfer.worlds.shapes.language import article
from cliptransfer.worlds.shapes.render import View, render
from cliptransfer.worlds.shapes.world import COCO_ID_BASE, coco_scene, object_records

__all__ = ["build_clip_corpus", "region_caption", "region_crop_box"]

GENERATOR = "cliptransfer-clip-corpus"
VERSION = 2
CROP_PX = 128  # rendered crop side: above the packaged CLIP's 96 px, so its random crops stay sharp
MARGIN = 1.6  # crop side / longest box side: some background around the object, as in a crop
MIN_SIDE = 24  # px: tiny boxes still get context


def region_crop_box(bbox: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) around a box, MARGIN times its longest side (at least
    MIN_SIDE, at most the image's short side), shifted to lie inside the image."""
    x0, y0, x1, y1 = bbox
    side = round(min(max(MARGIN * max(x1 - x0, y1 - y0), MIN_SIDE), min(width, height)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(round(cx - side / 2), 0), width - side)
    top = min(max(round(cy - side / 2), 0), height - side)
    return left, top, left + side, top + side


def region_caption(label: str, attributes: list[str], rng: random.Random) -> str:
    """A true description of one object: always its shape; its colour (p 0.5), size (p 0.5) and
    stripes (p 0.6 when striped) as a real annotator would vary them. Colour is left out half
    the time so that shape alone must pick the crop out of a batch (named in 80 % of captions,
    colour let the loss ignore shape: zero-shot shape 55.6 % vs 100 % colour)."""
    color, size, texture = attributes[0], attributes[1], attributes[2]
    words = [
        size if rng.random() < 0.5 else None,
        "striped" if texture == "striped" and rng.random() < 0.6 else None,
        color if rng.random() < 0.5 else None,
        label,
    ]
    phrase = article(" ".join(w for w in words if w))
    frame = rng.choice(("{}", "{}", "a close-up of {}", "a photo of {}", "{} in the picture"))
    return frame.format(phrase)


def _regions(world: Path, out: Path, seed: int) -> Iterator[dict]:
    objects_file = world / "objects" / "train2014.json"
    data = read_json(objects_file)
    world_seed = read_json(world / "manifest.json")["seed"]
    (out / "images" / "regions").mkdir(parents=True, exist_ok=True)
    for image in data["images"]:
        scene = coco_scene(world_seed, "train", image["image_id"] - COCO_ID_BASE["train"])
        if object_records(scene) != image["objects"]:
            raise ValueError(
                f"{objects_file}: image {image['image_id']}: its objects differ from the scene the "
                f"generator makes for seed {world_seed} (a world from another generator version?)"
            )
        for k, obj in enumerate(image["objects"]):
            if len(obj["attributes"]) != 3:
                raise ValueError(
                    f"{objects_file}: image {image['image_id']} object {k}: expected "
                    f"[colour, size, texture] attributes, got {obj['attributes']}"
                )
            left, top, right, bottom = region_crop_box(obj["bbox"], image["width"], image["height"])
            crop = render(scene, View(left, top, right, bottom, CROP_PX, CROP_PX))
            rel = f"images/regions/{image['image_id']}_{k}.jpg"
            crop.save(out / rel, quality=95)
            rng = random.Random(f"{GENERATOR}/{seed}/{image['image_id']}/{k}")
            caption = region_caption(obj["label"], obj["attributes"], rng)
            yield {"image": rel, "caption": caption, "source": "shapes-region"}


def _copied(pairs_file: Path, image_root: Path, out: Path, folder: str, source: str):
    """Records of a pairs file with their images copied under images/<folder>/ (same names)."""
    records = []
    for line_no, row in iter_jsonl(pairs_file):
        if "image" not in row or "caption" not in row:
            raise ValueError(f"{pairs_file}:{line_no}: record without image/caption")
        rel = f"images/{folder}/{row['image']}"
        dst = out / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image_root / row["image"], dst)
        records.append({"image": rel, "caption": row["caption"], "source": source})
    return records


def build_clip_corpus(
    shapes: str | Path,
    houses: str | Path | None,
    out: str | Path,
    *,
    seed: int = 0,
    house_repeats: int = 3,
    overwrite: bool = False,
) -> Path:
    """Write the corpus (see the module docstring) to `out`; reused when already complete.
    `house_repeats` lists each house-view pair that many times (the houses have ~1k captioned
    views against ~18k Shapes pairs); each repeat gets its own augmentation."""
    shapes = Path(shapes).absolute()
    houses = Path(houses).absolute() if houses else None
    for f in [shapes / "pairs" / "train.jsonl", shapes / "objects" / "train2014.json"] + (
        [houses / "captions" / "views_train.jsonl"] if houses else []
    ):
        if not f.is_file():
            raise FileNotFoundError(f"clip corpus: {f} missing (prepare the world first)")
    identity = {"version": VERSION, "shapes": str(shapes), "houses": str(houses), "seed": seed,
                "house_repeats": house_repeats}  # fmt: skip

    def generate(tmp: Path) -> None:
        scenes = _copied(shapes / "pairs" / "train.jsonl", shapes, tmp, "scenes", "shapes-scene")
        regions = list(_regions(shapes, tmp, seed))
        train = scenes + regions
        counts = {"shapes-scene": len(scenes), "shapes-region": len(regions)}
        if houses:
            views = _copied(houses / "captions" / "views_train.jsonl", houses / "captions", tmp,
                            "houses", "house-view")  # fmt: skip
            train += views * house_repeats
            counts["house-view"] = len(views)
        val = _copied(shapes / "pairs" / "val.jsonl", shapes, tmp, "scenes", "shapes-scene")
        counts["train.jsonl"] = write_jsonl(tmp / "train.jsonl", train)
        counts["val.jsonl"] = write_jsonl(tmp / "val.jsonl", val)
        write_json(tmp / "manifest.json", {"generator": GENERATOR, **identity, "counts": counts})

    return prepare_atomically(out, GENERATOR, identity, generate, overwrite=overwrite,
                              what="clip corpus")  # fmt: skip
