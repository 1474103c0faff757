"""The embedded Shapes world: determinism, real-format fidelity (COCO captions, pairs, objects),
idempotence. Its questions and hypotheses: test_shapes_annotations.py."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cliptransfer.worlds.shapes import SIZES, default_world_dir, prepare_shapes
from cliptransfer.worlds.shapes.formats import write_openclip_csv, write_shards
from cliptransfer.worlds.shapes.render import View, render
from cliptransfer.worlds.shapes.scene import Obj, Scene

# The world's vocabulary, written out independently of the generator.
COLORS = {"red", "orange", "yellow", "green", "blue", "purple", "gray", "white"}
SHAPES = {"circle", "square", "triangle", "star", "diamond", "cross"}


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepare_shapes(tmp_path_factory.mktemp("shapes") / "tiny", "tiny", seed=0)


def _load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _jsonl(root: Path, rel: str) -> list[dict]:
    return [json.loads(line) for line in (root / rel).read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = prepare_shapes(tmp_path / "again", "tiny", seed=0)
    other = prepare_shapes(tmp_path / "other", "tiny", seed=1)
    ref = _digest(world)
    assert _digest(again) == ref
    diff = _digest(other)
    assert diff.keys() == ref.keys()
    changed = [k for k in ref if ref[k] != diff[k]]
    assert "vqa/v2_mscoco_train2014_annotations.json" in changed
    assert len(changed) > 0.9 * len(ref)


def test_manifest_lists_every_file_and_count(world):
    manifest = _load(world, "manifest.json")
    assert (manifest["generator"], manifest["size"], manifest["seed"]) == (
        "cliptransfer.data.shapes",
        "tiny",
        0,
    )
    on_disk = {p.relative_to(world).as_posix() for p in world.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    counts = manifest["counts"]
    spec = SIZES["tiny"]
    assert counts["images/train2014"] == spec.coco_train == 48
    assert counts["images/val2014"] == spec.coco_val == 24
    assert counts["pairs/train.jsonl"] == 5 * spec.coco_train
    assert counts["snli_ve/snli_ve_train.jsonl"] == 9 * spec.flickr_train
    assert not list(world.parent.glob(".tiny.tmp-*")), "temporary folder left behind"


def test_coco_captions_format_and_ids(world):
    all_ids = set()
    for split, n in (("train", 48), ("val", 24)):
        data = _load(world, f"annotations/captions_{split}2014.json")
        assert set(data) == {"info", "licenses", "images", "annotations"}
        ids = [im["id"] for im in data["images"]]
        assert len(ids) == n == len(set(ids))
        assert not all_ids & set(ids), "image ids must be unique across splits"
        all_ids |= set(ids)
        for im in data["images"]:
            assert {"id", "file_name", "width", "height"} <= set(im)
            assert im["file_name"] == f"COCO_{split}2014_{im['id']:012d}.jpg"
            with Image.open(world / "images" / f"{split}2014" / im["file_name"]) as img:
                assert (img.size, img.mode, img.format) == (
                    (im["width"], im["height"]),
                    "RGB",
                    "JPEG",
                )
                assert img.size == (160, 120) and "exif" not in img.info
        anns = data["annotations"]
        assert [set(a) for a in anns[:1]] == [{"id", "image_id", "caption"}]
        assert len({a["id"] for a in anns}) == len(anns) == 5 * n
        per_image = Counter(a["image_id"] for a in anns)
        assert set(per_image) == set(ids) and set(per_image.values()) == {5}
        for image_id in ids:  # five different captions per image
            assert len({a["caption"] for a in anns if a["image_id"] == image_id}) == 5


def test_pairs_csv_and_webdataset_shards(world):
    caps = _load(world, "annotations/captions_train2014.json")
    by_key = {(a["image_id"], a["caption"]) for a in caps["annotations"]}
    pairs = _jsonl(world, "pairs/train.jsonl")
    assert {(p["image_id"], p["caption"]) for p in pairs} == by_key
    assert all(
        (world / p["image"]).is_file() and set(p) == {"image", "caption", "image_id"} for p in pairs
    )
    with open(world / "pairs/train.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["filepath", "title"]
    assert [(r["filepath"], r["title"]) for r in rows] == [
        (p["image"], p["caption"]) for p in pairs
    ]
    assert (world / "captions.txt").read_text().splitlines() == [p["caption"] for p in pairs]

    shards = sorted((world / "pairs/shards").glob("*.tar"))
    assert [s.name for s in shards] == ["train-000000.tar"]  # val lives in pairs/shards_val/
    assert [s.name for s in (world / "pairs/shards_val").glob("*.tar")] == ["val-000000.tar"]
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
        keys = []
        for i in range(0, len(members), 3):
            group = members[i : i + 3]
            key = group[0].name.rsplit(".", 1)[0]
            assert [m.name for m in group] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
            assert all(
                (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
                for m in group
            )
            meta = json.loads(tar.extractfile(group[2]).read())
            caption = tar.extractfile(group[1]).read().decode()
            assert (
                re.fullmatch(r"\d{12}_[0-4]", key)
                and key == f"{meta['image_id']:012d}_{meta['caption_index']}"
            )
            assert (meta["image_id"], caption) in by_key
            jpg = world / "images/train2014" / meta["file_name"]
            assert tar.extractfile(group[0]).read() == jpg.read_bytes()
            keys.append(key)
    assert len(keys) == len(set(keys)) == len(pairs)
    first = [k.split("_")[0] for k in keys[:48]]
    assert len(set(first)) == 48, "caption-major order: no image twice among the first N samples"


def test_shard_splitting_and_csv_guard(tmp_path):
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(b"\xff\xd8fake")
    samples = [(f"{i:012d}_0", jpg, f"caption {i}", {"i": i}) for i in range(10)]
    counts = write_shards(tmp_path / "shards", "train", samples, per_shard=4)
    assert counts == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2}
    with tarfile.open(tmp_path / "shards/train-000002.tar") as tar:
        assert tar.getnames() == [
            f"{i:012d}_0.{ext}" for i in (8, 9) for ext in ("jpg", "txt", "json")
        ]
    with pytest.raises(ValueError, match=r"bad\.csv.*tab"):
        write_openclip_csv(tmp_path / "bad.csv", [("a.jpg", "a\tcaption")])


def test_objects_files_and_boxes(world):
    for rel, n in (
        ("objects/train2014.json", 48),
        ("objects/val2014.json", 24),
        ("objects/flickr30k.json", 40),
    ):
        data = _load(world, rel)
        assert set(data["labels"]) == SHAPES and set(data["attributes"]) >= COLORS | {
            "small",
            "large",
        }
        assert len(data["images"]) == n
        for im in data["images"]:
            assert (
                set(im) == {"image_id", "file_name", "width", "height", "objects"}
                and 2 <= len(im["objects"]) <= 6
            )
            for o in im["objects"]:
                x1, y1, x2, y2 = o["bbox"]
                assert 0 <= x1 < x2 <= im["width"] and 0 <= y1 < y2 <= im["height"]
                assert o["label"] in data["labels"] and set(o["attributes"]) <= set(
                    data["attributes"]
                )


def test_boxes_enclose_the_drawn_pixels():
    bg = (20, 20, 20)
    for shape in sorted(SHAPES):
        obj = Obj(shape, "red", "large", "solid", 70.0, 50.0, 18.0, 10.0, (220, 30, 30))
        scene = Scene(160, 120, "black", bg, (obj,))
        img = render(scene)
        x1, y1, x2, y2 = obj.bbox
        px = img.load()
        drawn = [(x, y) for x in range(160) for y in range(120) if px[x, y] != bg]
        assert drawn and all(x1 - 1 <= x <= x2 + 1 and y1 - 1 <= y <= y2 + 1 for x, y in drawn), (
            shape
        )
        assert min(x for x, _ in drawn) <= x1 + 2 and max(x for x, _ in drawn) >= x2 - 2, shape
        full = render(scene, View(0, 0, 160, 120, 160, 120))
        assert full.tobytes() == img.tobytes()
        zoom = render(scene, View(40, 20, 100, 80, 64, 64))
        assert zoom.size == (64, 64) and zoom.getpixel((32, 32)) != bg


def test_classify_set(world):
    classes = _load(world, "classify/classes.json")
    assert (
        set(classes) == {"shape", "color"}
        and set(classes["shape"]) == SHAPES
        and set(classes["color"]) == COLORS
    )
    rows = _jsonl(world, "classify/val.jsonl")
    assert len(rows) == 48 and all(
        set(r) == {"image", "shape", "color"} and (world / r["image"]).is_file() for r in rows
    )
    assert set(Counter(r["shape"] for r in rows).values()) == {8}
    assert set(Counter(r["color"] for r in rows).values()) == {6}


def test_idempotent_and_guarded(world, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in world.rglob("*")}
    t0 = time.perf_counter()
    assert prepare_shapes(world, "tiny", seed=0) == world
    assert time.perf_counter() - t0 < 0.5
    assert {p: p.stat().st_mtime_ns for p in world.rglob("*")} == before
    with pytest.raises(FileExistsError, match="different Shapes world"):
        prepare_shapes(world, "tiny", seed=3)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        prepare_shapes(foreign, "tiny", overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_size_and_default_dir(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"huge.*\['medium', 'small', 'tiny'\]"):
        prepare_shapes(tmp_path / "w", "huge")
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("CLIPTRANSFER_CACHE", str(tmp_path))
    assert default_world_dir("small", 3) == tmp_path / "shapes-small-seed3-v2"
    monkeypatch.delenv("CLIPTRANSFER_CACHE")
    assert default_world_dir() == Path.home() / ".cache/cliptransfer/shapes-small-seed0-v2"


def test_question_dense_train_split_changes_only_the_train_questions(world, monkeypatch, tmp_path):
    """`small`'s preset gives train images 24-48 questions; every other file stays what the
    4-8 preset writes, byte for byte (the random streams are named per purpose)."""
    from dataclasses import replace

    monkeypatch.setitem(SIZES, "dense", replace(SIZES["tiny"], train_questions=(12, 24)))
    dense = prepare_shapes(tmp_path / "dense", "dense", seed=0)
    train_q = "vqa/v2_OpenEnded_mscoco_train2014_questions.json"
    train_a = "vqa/v2_mscoco_train2014_annotations.json"
    a, b = _digest(world), _digest(dense)
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} == {train_q, train_a, "manifest.json"}
    per_image = Counter(q["image_id"] for q in _load(dense, train_q)["questions"])
    assert len(per_image) == 48 and min(per_image.values()) >= 12 and max(per_image.values()) <= 24
    sparse = Counter(q["image_id"] for q in _load(world, train_q)["questions"])
    assert max(sparse.values()) <= 8
    assert SIZES["small"].train_questions == (24, 48) and SIZES["medium"].train_questions == (4, 8)
