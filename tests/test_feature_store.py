"""Feature store: exact round trips, fp16, metadata checks, crash-safe resume, ranks, workers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cliptransfer.visual.store import (
    FeatureStore,
    MissingFeatureError,
    StoreError,
    StoreMismatchError,
    canonical_image_id,
    parse_coco_id,
)

GRID_META = {"kind": "grid", "grid_size": [2, 3], "channels": 4, "backbone": "RN-tiny"}


def _grid(i: int) -> np.ndarray:
    # Distinct exact values per image: row r, channel c of image i = 100 i + 10 r + c.
    return (100 * i + 10 * np.arange(6)[:, None] + np.arange(4)[None, :]).astype(np.float32)


def _regions(i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    feats = (np.arange(n * 8).reshape(n, 8) + 1000 * i).astype(np.float32) / 8
    boxes = np.stack([np.arange(n), np.arange(n) + 1, np.arange(n) + 5, np.arange(n) + 7], 1)
    return feats, boxes.astype(np.float32) + i


def test_grid_round_trip_exact(tmp_path: Path):
    with FeatureStore.create(tmp_path / "s", GRID_META) as w:
        for i in (5, 1, 3):
            w.add(i, _grid(i), image_w=640 + i, image_h=480)
        w.add("COCO_x", torch.from_numpy(_grid(7)))  # tensors are accepted too
    store = FeatureStore.open(tmp_path / "s")
    assert len(store) == 4 and store.ids() == ["5", "1", "3", "COCO_x"]  # write order
    assert 5 in store and "5" in store and 2 not in store and None not in store
    rec = store[3]
    assert rec["features"].dtype == torch.float32
    assert torch.equal(rec["features"], torch.from_numpy(_grid(3)))
    assert rec["grid_hw"] == (2, 3) and (rec["image_w"], rec["image_h"]) == (643, 480)
    assert store["COCO_x"]["image_w"] is None  # not given -> unknown
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["backbone"] == "RN-tiny" and meta["dtype"] == "float32"
    assert meta["format_version"] == 1 and meta["row_fields"] == {}
    with pytest.raises(MissingFeatureError, match=r"image id '2' not in feature store .*s"):
        store[2]
    with pytest.raises(KeyError):
        store["nope"]


def test_fp16_storage_reads_float32(tmp_path: Path):
    x = np.array([[0.1, -2.5, 3.14159, 65504.0]] * 6, dtype=np.float32)
    with FeatureStore.create(tmp_path / "s", {**GRID_META, "dtype": "float16"}) as w:
        w.add("a", x)
        with pytest.raises(StoreError, match=r"image 'b'.*overflows float16"):
            w.add("b", x * 2)
        with pytest.raises(StoreError, match=r"image 'c'.*NaN"):
            w.add("c", np.full((6, 4), np.nan, np.float32))
    out = FeatureStore.open(tmp_path / "s")["a"]["features"]
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(x.astype(np.float16).astype(np.float32)))
    assert (tmp_path / "s" / "shard-r0-00000.bin").stat().st_size == 6 * 4 * 2  # fp16 on disk


def test_regions_variable_length_and_row_fields(tmp_path: Path):
    meta = {
        "kind": "regions",
        "channels": 8,
        "row_fields": {"boxes": ["float32", 4], "objects_id": ["int64", 1]},
    }
    counts = {"10": 10, "11": 36, "12": 5}
    with FeatureStore.create(tmp_path / "s", meta) as w:
        for key, n in counts.items():
            feats, boxes = _regions(int(key), n)
            w.add(key, feats, boxes=boxes, image_w=500, image_h=375, objects_id=np.arange(n) * 3)
        with pytest.raises(StoreError, match=r"missing \['objects_id'\]"):
            w.add("13", feats, boxes=boxes)
        with pytest.raises(StoreError, match=r"image '12': already stored"):
            w.add("12", feats, boxes=boxes, objects_id=np.arange(5))
    store = FeatureStore.open(tmp_path / "s")
    for key, n in counts.items():
        rec = store[key]
        feats, boxes = _regions(int(key), n)
        assert torch.equal(rec["features"], torch.from_numpy(feats))
        assert torch.equal(rec["boxes"], torch.from_numpy(boxes))
        assert rec["objects_id"].dtype == torch.int64
        assert rec["objects_id"].tolist() == list(range(0, 3 * n, 3))
        assert (rec["image_w"], rec["image_h"]) == (500, 375) and "grid_hw" not in rec


def test_bad_shapes_name_store_and_image(tmp_path: Path):
    with FeatureStore.create(tmp_path / "s", GRID_META) as w:
        with pytest.raises(StoreError, match=r"s, image 'x': features must be \(N, 4\)"):
            w.add("x", np.zeros((6, 5), np.float32))
        with pytest.raises(StoreError, match=r"image 'y': 5 feature rows but the 2x3 grid has 6"):
            w.add("y", np.zeros((5, 4), np.float32))
    with pytest.raises(StoreError, match="kind must be"):
        FeatureStore.create(tmp_path / "t", {"kind": "pixels", "channels": 3})
    with pytest.raises(FileNotFoundError, match="no feature store at"):
        FeatureStore.open(tmp_path / "missing")


def test_metadata_mismatch_names_fields(tmp_path: Path):
    FeatureStore.create(tmp_path / "s", GRID_META).close()
    with pytest.raises(StoreMismatchError) as err:
        FeatureStore.open(tmp_path / "s", expect={"grid_size": (2, 3), "channels": 8, "layer": "x"})
    msg = str(err.value)
    assert (
        "channels: expected 8, found 4" in msg and "layer: expected 'x', found '<missing>'" in msg
    )
    assert "grid_size" not in msg  # a tuple equals the stored list
    with pytest.raises(StoreMismatchError, match=r"dtype: expected 'float16', found 'float32'"):
        FeatureStore.create(tmp_path / "s", {**GRID_META, "dtype": "float16"})
    # informational fields may differ when the caller says so
    FeatureStore.create(
        tmp_path / "s", {**GRID_META, "backbone": "moved"}, ignore_keys=("backbone",)
    ).close()


def _crashing_writer(root: str) -> None:
    w = FeatureStore.create(root, GRID_META, commit_every=2)
    for i in range(5):
        w.add(i, _grid(i))  # records 0-3 committed in pairs, record 4 only written
    with open(Path(root) / "shard-r0-00000.bin", "ab") as f:
        f.write(b"\x01" * 50)  # a torn partial record after it
    os._exit(0)  # no close(): the process dies


def test_crash_then_resume(tmp_path: Path):
    root = tmp_path / "s"
    proc = mp.get_context("fork").Process(target=_crashing_writer, args=(str(root),))
    proc.start()
    proc.join()
    store = FeatureStore.open(root)
    assert store.ids() == ["0", "1", "2", "3"]  # the uncommitted record is not visible
    with FeatureStore.create(root, GRID_META, commit_every=2) as w:
        assert 3 in w and 4 not in w
        for i in range(6):
            if i not in w:
                w.add(i, _grid(i))
    store = FeatureStore.open(root)
    assert store.ids() == [str(i) for i in range(6)]
    for i in range(6):
        assert torch.equal(store[i]["features"], torch.from_numpy(_grid(i)))
    assert (root / "shard-r0-00000.bin").stat().st_size == 6 * 6 * 4 * 4  # torn tail dropped


def test_truncated_shard_is_reported(tmp_path: Path):
    with FeatureStore.create(tmp_path / "s", GRID_META) as w:
        w.add("a", _grid(0))
    os.truncate(tmp_path / "s" / "shard-r0-00000.bin", 10)
    with pytest.raises(StoreError, match=r"shard-r0-00000.bin: truncated"):
        FeatureStore.open(tmp_path / "s")


def test_ranks_write_separate_shards_merged_on_open(tmp_path: Path):
    root = tmp_path / "s"
    record = 6 * 4 * 4
    writers = [FeatureStore.create(root, GRID_META, rank=r, shard_bytes=2 * record) for r in (0, 1)]
    with pytest.raises(StoreError, match="another writer with rank 1"):
        FeatureStore.create(root, GRID_META, rank=1)
    for i in range(7):
        writers[i % 2].add(i, _grid(i))
    for w in writers:
        w.close()
    names = sorted(p.name for p in root.glob("shard-*.index.json"))
    assert names == [f"shard-r{r}-{n:05d}.index.json" for r, n in
                     [(0, 0), (0, 1), (1, 0), (1, 1)]]  # fmt: skip
    store = FeatureStore.open(root)
    assert sorted(store.ids(), key=int) == [str(i) for i in range(7)]
    for i in range(7):
        assert torch.equal(store[i]["features"], torch.from_numpy(_grid(i)))
    # a resumed writer of another world size sees every rank's ids
    with FeatureStore.create(root, GRID_META, rank=0) as w:
        assert all(i in w for i in range(7)) and len(w) == 7


class _Reads(Dataset):
    def __init__(self, store: FeatureStore) -> None:
        self.store, self.ids = store, store.ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store[self.ids[i]]["features"]


def test_dataloader_workers_and_pickle(tmp_path: Path):
    with FeatureStore.create(tmp_path / "s", GRID_META) as w:
        for i in range(4):
            w.add(i, _grid(i))
    store = FeatureStore.open(tmp_path / "s")
    store[0]  # map a shard in the parent first: workers must not reuse it blindly
    loader = DataLoader(_Reads(store), batch_size=2, num_workers=2,
                        multiprocessing_context="fork")  # fmt: skip
    got = torch.cat(list(loader))
    assert torch.equal(got, torch.from_numpy(np.stack([_grid(i) for i in range(4)])))
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == {} and torch.equal(clone[2]["features"], torch.from_numpy(_grid(2)))


def test_coco_ids():
    assert parse_coco_id("COCO_train2014_000000000123.jpg") == 123
    assert parse_coco_id("COCO_val2014_000000393225") == 393225
    assert parse_coco_id("1000092795.jpg") is None
    assert canonical_image_id("COCO_test2015_000000000001") == "1"
    assert canonical_image_id("1000092795") == "1000092795" and canonical_image_id(42) == "42"
