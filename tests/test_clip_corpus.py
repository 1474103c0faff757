"""The packaged CLIP's corpus: region crops (boxes worked out by hand), true region captions, and
the folder of pairs built from a Shapes world and a houses captions file."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptransfer.cli import main
from cliptransfer.contrastive.pairs import load_pairs
from cliptransfer.worlds.clip_corpus import (
    CROP_PX,
    build_clip_corpus,
    region_caption,
    region_crop_box,
)


def test_region_crop_box_by_hand():
    # 33.56 px box: side round(1.6 * 33.56) = 54 around centre (60.84, 38.41).
    assert region_crop_box([44.06, 21.63, 77.62, 55.19], 160, 120) == (34, 11, 88, 65)
    # side 32 around (141.59, 101.83): left 126, top round(85.83) = 86 (fits: <= 120 - 32).
    assert region_crop_box([131.56, 91.8, 151.62, 111.86], 160, 120) == (126, 86, 158, 118)
    # side round(1.6 * 19) = 30 near the corner: shifted inside to (130, 90).
    assert region_crop_box([150, 100, 159, 119], 160, 120) == (130, 90, 160, 120)
    # a 5 px box still gets MIN_SIDE = 24 of context; a huge one at most the short side.
    assert region_crop_box([78, 58, 83, 63], 160, 120) == (68, 48, 92, 72)
    assert region_crop_box([0, 0, 160, 120], 160, 120) == (20, 0, 140, 120)


def test_region_captions_always_name_the_shape_and_only_true_attributes():
    rng = random.Random(0)
    attrs = ["orange", "large", "striped"]
    seen = [region_caption("triangle", attrs, rng) for _ in range(200)]
    allowed = {"a", "an", "close-up", "of", "photo", "in", "the", "picture", "triangle", *attrs}
    for caption in seen:
        words = caption.split()
        assert "triangle" in words and set(words) <= allowed, caption
        article = words[words.index("triangle") - 1 - sum(w in attrs for w in words)]
        first = words[words.index(article) + 1]
        assert article == ("an" if first[0] in "aeiou" else "a"), caption
    assert "solid" not in " ".join(region_caption("star", ["red", "small", "solid"], rng)
                                   for _ in range(50))  # fmt: skip
    # Every attribute is sometimes left out, and the bare shape occurs.
    assert any("orange" not in c for c in seen) and any(c == "a triangle" for c in seen)


def _houses_captions(root: Path) -> Path:
    views = root / "captions" / "views" / "scanA"
    views.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(["a view of the kitchen", "the bedroom with a red star ahead"]):
        Image.new("RGB", (128, 96), (10 * i, 20, 30)).save(views / f"vp_{i}.jpg")
        rows.append({"image": f"views/scanA/vp_{i}.jpg", "caption": caption, "scan": "scanA",
                     "viewpoint": "vp", "view": i})  # fmt: skip
    (root / "captions" / "views_train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    return root


def test_corpus_holds_scenes_regions_and_repeated_house_views(tiny_world: Path, tmp_path: Path):
    houses = _houses_captions(tmp_path / "houses")
    out = build_clip_corpus(tiny_world, houses, tmp_path / "corpus", house_repeats=3)
    manifest = json.loads((out / "manifest.json").read_text())
    objects = json.loads((tiny_world / "objects" / "train2014.json").read_text())["images"]
    n_objects = sum(len(im["objects"]) for im in objects)
    scene_pairs = len((tiny_world / "pairs" / "train.jsonl").read_text().splitlines())
    assert manifest["counts"] == {
        "shapes-scene": scene_pairs, "shapes-region": n_objects, "house-view": 2,
        "train.jsonl": scene_pairs + n_objects + 3 * 2,
        "val.jsonl": len((tiny_world / "pairs" / "val.jsonl").read_text().splitlines()),
    }  # fmt: skip
    train = load_pairs(out / "train.jsonl")  # images resolve relative to the corpus folder
    assert all(Path(r.image).is_file() for r in train)
    # The first object's crop is its box's window rendered sharp at CROP_PX: its pixels match the
    # JPEG's cut of the same window upscaled (the same scene), to JPEG/resampling error.
    first = objects[0]
    box = region_crop_box(first["objects"][0]["bbox"], first["width"], first["height"])
    with Image.open(out / "images" / "regions" / f"{first['image_id']}_0.jpg") as crop:
        assert crop.size == (CROP_PX, CROP_PX)
        sharp = np.asarray(crop.convert("RGB"), dtype=np.float32)
    with Image.open(tiny_world / "images" / "train2014" / first["file_name"]) as scene:
        cut = scene.convert("RGB").crop(box).resize((CROP_PX, CROP_PX), Image.BILINEAR)
    cut_arr = np.asarray(cut, dtype=np.float32)
    assert np.abs(sharp - cut_arr).mean() < 12  # same content...
    assert (
        np.abs(np.diff(sharp, axis=1)).mean() > np.abs(np.diff(cut_arr, axis=1)).mean()
    )  # sharper
    assert [r.caption for r in train].count("the bedroom with a red star ahead") == 3
    # Reused when complete; a different request in the same folder is refused.
    assert build_clip_corpus(tiny_world, houses, out, house_repeats=3) == out
    with pytest.raises(FileExistsError, match="different clip corpus"):
        build_clip_corpus(tiny_world, houses, out, house_repeats=1)


def test_corpus_refuses_objects_that_are_not_the_generators(tiny_world: Path, tmp_path: Path):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    objects_file = world / "objects" / "train2014.json"
    data = json.loads(objects_file.read_text())
    data["images"][1]["objects"][0]["bbox"][0] += 1.0
    objects_file.write_text(json.dumps(data))
    image_id = data["images"][1]["image_id"]
    with pytest.raises(ValueError, match=f"train2014.json: image {image_id}: its objects differ"):
        build_clip_corpus(world, None, tmp_path / "corpus")


def test_corpus_cli_and_missing_inputs(tiny_world: Path, tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError, match="views_train.jsonl missing"):
        build_clip_corpus(tiny_world, tmp_path / "nohouses", tmp_path / "c1")
    assert main(["prepare", "clip-corpus", "--shapes", str(tiny_world), "--out",
                 str(tmp_path / "c2")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "shapes-region" in printed and "house-view" not in printed
