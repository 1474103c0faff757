"""Presence probe: labels from object annotations worked out by hand; a store whose regions
encode colour one-hot is read perfectly, one of pure noise at chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cliptransfer.visual.presence_probe import presence_labels, probe_presence
from cliptransfer.visual.store import FeatureStore

COLORS = ("red", "blue", "green")
SHAPES = ("circle", "square")


def _write(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images}))
    return path


def test_presence_labels_by_hand(tmp_path: Path):
    path = _write(
        tmp_path / "objects.json",
        [
            {"image_id": 7, "objects": [{"label": "circle", "attributes": ["red", "solid"]}]},
            {
                "image_id": 8,
                "objects": [
                    {"label": "square", "attributes": ["blue", "solid"]},
                    {"label": "circle", "attributes": ["blue"]},
                ],
            },
        ],
    )
    got = presence_labels(path, skip=frozenset({"solid"}))
    assert got.image_ids == ["7", "8"]
    assert got.classes == [
        ("labels", "circle"),
        ("labels", "square"),
        ("attributes", "blue"),
        ("attributes", "red"),
        ("pairs", "blue circle"),
        ("pairs", "blue square"),
        ("pairs", "red circle"),
    ]
    assert got.targets.tolist() == [[1, 0, 0, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1, 0]]
    # val keeps train's columns: unseen classes are dropped, absent ones are 0
    val = _write(
        tmp_path / "val.json",
        [{"image_id": 9, "objects": [{"label": "star", "attributes": ["red"]}]}],
    )
    v = presence_labels(val, classes=got.classes, skip=frozenset({"solid"}))
    assert v.targets.tolist() == [[0, 0, 0, 1, 0, 0, 0]]


def test_presence_labels_name_the_bad_record(tmp_path: Path):
    path = _write(tmp_path / "bad.json", [{"image_id": 1, "objects": [{"attributes": ["red"]}]}])
    with pytest.raises(ValueError, match=r"bad\.json: image 1 object 0 has no 'label'"):
        presence_labels(path)
    path = _write(tmp_path / "bad2.json", [{"objects": []}])
    with pytest.raises(ValueError, match=r"bad2\.json: image record 0"):
        presence_labels(path)


def _world(tmp_path: Path, n: int, signal: bool) -> tuple[FeatureStore, Path, Path]:
    """`n` images of 1-3 objects; each region's feature is [one-hot colour, one-hot shape, noise]
    (or pure noise), padded images of different region counts in one store."""
    gen = torch.Generator().manual_seed(0)
    images = []
    with FeatureStore.create(tmp_path / "store", {"kind": "regions", "channels": 9}) as w:
        for i in range(n):
            k = int(torch.randint(1, 4, (1,), generator=gen))
            objs, rows = [], []
            for _ in range(k):
                c = int(torch.randint(len(COLORS), (1,), generator=gen))
                s = int(torch.randint(len(SHAPES), (1,), generator=gen))
                objs.append({"label": SHAPES[s], "attributes": [COLORS[c]]})
                row = 0.1 * torch.randn(9, generator=gen)
                if signal:
                    row[c] += 1
                    row[len(COLORS) + s] += 1
                rows.append(row)
            boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * k)
            w.add(i, torch.stack(rows), boxes=boxes, image_w=32, image_h=32)
            images.append({"image_id": i, "objects": objs})
    train = _write(tmp_path / "train.json", images[: n * 3 // 4])
    val = _write(tmp_path / "val.json", images[n * 3 // 4 :])
    return FeatureStore.open(tmp_path / "store"), train, val


@pytest.mark.parametrize("signal", [True, False])
def test_probe_reads_what_the_regions_carry(tmp_path: Path, signal: bool):
    store, train_path, val_path = _world(tmp_path, 240, signal)
    train = presence_labels(train_path)
    val = presence_labels(val_path, classes=train.classes)
    report = probe_presence(store, train, val, epochs=60, lr=1e-2)
    assert set(report) == {"labels", "attributes", "pairs"}
    assert report["attributes"]["classes"] == 3 and report["pairs"]["classes"] == 6
    if signal:
        assert report["attributes"]["balanced"] == 100.0
        assert report["labels"]["balanced"] == 100.0
    else:
        assert 35 < report["attributes"]["balanced"] < 65
        assert report["attributes"]["accuracy"] < report["attributes"]["majority"] + 10


def test_probe_names_missing_images(tmp_path: Path):
    store, train_path, _ = _world(tmp_path, 8, True)
    extra = _write(
        tmp_path / "extra.json",
        [{"image_id": 999, "objects": [{"label": "circle", "attributes": ["red"]}]}],
    )
    train = presence_labels(train_path)
    with pytest.raises(KeyError, match="val: 1 images are not in the store"):
        probe_presence(store, train, presence_labels(extra, classes=train.classes), epochs=1)
