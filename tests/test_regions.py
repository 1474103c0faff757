"""Region feature readers: BUTD/LXMERT TSV and HDF5 files written by hand, exact round trips."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cliptransfer.visual.region_import import import_regions, write_tsv
from cliptransfer.visual.regions import (
    RegionFormatError,
    UnsafePickleError,
    detect_format,
    iter_regions,
    read_index,
)
from cliptransfer.visual.store import FeatureStore

# (image id, width, height, boxes): widths differ from heights so a swapped order shows.
IMAGES = [("9", 640, 480, 10), ("25", 500, 375, 36), ("30", 427, 640, 5)]


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode()


def _arrays(k: int, n: int, d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    x1 = rng.uniform(0, 200, n).astype(np.float32)
    y1 = rng.uniform(0, 150, n).astype(np.float32)
    return {
        "boxes": np.stack([x1, y1, x1 + 50, y1 + 80], 1).astype(np.float32),
        "features": rng.standard_normal((n, d)).astype(np.float32),
        "objects_id": rng.integers(0, 1600, n).astype(np.int64),
        "objects_conf": rng.uniform(0, 1, n).astype(np.float32),
        "attrs_id": rng.integers(0, 400, n).astype(np.int64),
        "attrs_conf": rng.uniform(0, 1, n).astype(np.float32),
    }


def _butd_file(path: Path, d: int = 2048) -> list[dict]:
    lines, recs = [], []
    for k, (iid, w, h, n) in enumerate(IMAGES):
        a = _arrays(k, n, d)
        # generate_tsv.py order: image_id, image_w, image_h, num_boxes, boxes, features
        lines.append(
            "\t".join([iid, str(w), str(h), str(n), _b64(a["boxes"]), _b64(a["features"])])
        )
        recs.append({"image_id": iid, "image_w": w, "image_h": h, **a})
    path.write_text("\n".join(lines) + "\n")
    return recs


def _lxmert_file(path: Path, d: int = 8) -> list[dict]:
    lines, recs = [], []
    for k, (iid, w, h, n) in enumerate(IMAGES):
        a = _arrays(k, n, d)
        name = f"COCO_val2014_{int(iid):012d}"
        cols = [name, str(h), str(w)]  # load_obj_tsv order: img_id, img_h, img_w, ...
        cols += [_b64(a[c]) for c in ("objects_id", "objects_conf", "attrs_id", "attrs_conf")]
        cols += [str(n), _b64(a["boxes"]), _b64(a["features"])]
        lines.append("\t".join(cols))
        recs.append({"image_id": name, "image_w": w, "image_h": h, **a})
    path.write_text("\r\n".join(lines) + "\r\n")  # csv's default line ending, as LXMERT's files
    return recs


def _check(got: list[dict], want: list[dict], keys: tuple[str, ...]) -> None:
    assert [g["image_id"] for g in got] == [w["image_id"] for w in want]
    for g, w in zip(got, want):
        assert (g["image_w"], g["image_h"]) == (w["image_w"], w["image_h"])
        for k in keys:
            assert g[k].dtype == w[k].dtype and np.array_equal(g[k], w[k]), (g["image_id"], k)


def test_butd_tsv_round_trip(tmp_path: Path):
    want = _butd_file(tmp_path / "a.tsv")  # 36 x 2048 base64 is ~390 KB: above csv's 128 KB
    assert detect_format(tmp_path / "a.tsv") == "butd"
    got = list(iter_regions(tmp_path / "a.tsv"))
    _check(got, want, ("boxes", "features"))
    assert [g["features"].shape for g in got] == [(10, 2048), (36, 2048), (5, 2048)]
    assert "objects_id" not in got[0]
    write_tsv(tmp_path / "b.tsv", got, "butd")  # our writer produces the same bytes
    assert (tmp_path / "b.tsv").read_bytes() == (tmp_path / "a.tsv").read_bytes()


def test_lxmert_tsv_round_trip(tmp_path: Path):
    want = _lxmert_file(tmp_path / "a.tsv")
    assert detect_format(tmp_path / "a.tsv") == "lxmert"
    got = list(iter_regions(tmp_path / "a.tsv"))
    _check(got, want, ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"))
    write_tsv(tmp_path / "b.tsv", got, "lxmert")
    assert list(iter_regions(tmp_path / "b.tsv"))[2]["image_h"] == 640


def test_truncated_line_error_and_skip(tmp_path: Path):
    path = tmp_path / "cut.tsv"
    _butd_file(path, d=8)
    text = path.read_text().rstrip("\n")
    head, last = text.rsplit("\n", 1)
    cut = last[: len(last) - 8]  # still valid base64 (multiple of 4 chars) but 6 bytes short
    path.write_text(head + "\n" + cut)
    with pytest.raises(RegionFormatError) as err:
        list(iter_regions(path))
    msg = str(err.value)
    assert "cut.tsv:line 3: image '30'" in msg and "num_boxes=5 x D x 4" in msg
    reader = iter_regions(path, skip_bad=True)
    assert [r["image_id"] for r in reader] == ["9", "25"] and reader.skipped == 1

    path.write_text(head + "\n" + last[: last.rindex("\t")])  # lost the features column
    with pytest.raises(RegionFormatError, match=r"line 3: image '30': 5 columns, expected 6"):
        list(iter_regions(path))
    path.write_text(head.replace("\t640\t", "\tabc\t", 1) + "\n" + last)
    with pytest.raises(RegionFormatError, match=r"line 1: image '9': image_w 'abc' is not an int"):
        list(iter_regions(path))
    path.write_text(head + "\n" + last[:-3])  # broken base64 padding
    with pytest.raises(RegionFormatError, match=r"line 3: image '30': features: invalid base64"):
        list(iter_regions(path))


def test_detection_rejects_other_files(tmp_path: Path):
    (tmp_path / "x.tsv").write_text("a\tb\tc\n")
    with pytest.raises(RegionFormatError, match=r"x.tsv: line 1 has 3 tab-separated columns"):
        iter_regions(tmp_path / "x.tsv")
    with pytest.raises(FileNotFoundError, match="region feature file not found"):
        iter_regions(tmp_path / "missing.tsv")


def _spatial(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    # detection_features_converter.py: x1/w, y1/h, x2/w, y2/h, bw/w, bh/h
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cols = [boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h, bw / w, bh / h]
    return np.stack(cols, 1).astype(np.float32)


def test_hdf5_adaptive_and_fixed(tmp_path: Path):
    recs = [{"image_id": iid, "image_w": w, "image_h": h, **_arrays(k, n, 8)}
            for k, (iid, w, h, n) in enumerate(IMAGES)]  # fmt: skip
    order = [1, 2, 0]  # the index, not the file order, says which row is which image
    with h5py.File(tmp_path / "train.hdf5", "w") as f:
        rows = [recs[i] for i in order]
        ends = np.cumsum([len(r["boxes"]) for r in rows])
        f["image_features"] = np.concatenate([r["features"] for r in rows])
        f["image_bb"] = np.concatenate([r["boxes"] for r in rows])
        f["spatial_features"] = np.concatenate(
            [_spatial(r["boxes"], r["image_w"], r["image_h"]) for r in rows]
        )
        starts = np.concatenate([[0], ends[:-1]])
        f["pos_boxes"] = np.stack([starts, ends], 1).astype(np.int32)  # [start, end) per image
    index = {int(recs[i]["image_id"]): row for row, i in enumerate(order)}
    (tmp_path / "train_imgid2idx.pkl").write_bytes(pickle.dumps(index, protocol=0))  # py2 style
    got = sorted(iter_regions(tmp_path / "train.hdf5"), key=lambda r: int(r["image_id"]))
    _check(got, recs, ("boxes", "features"))  # image size recovered exactly

    with h5py.File(tmp_path / "val36.hdf5", "w") as f:  # fixed K boxes: (N_img, K, D)
        f["image_features"] = np.stack([r["features"][:5] for r in recs])
        f["image_bb"] = np.stack([r["boxes"][:5] for r in recs])
    (tmp_path / "val36_imgid2idx.json").write_text(json.dumps({"9": 0, "25": 1, "30": 2}))
    got = list(iter_regions(tmp_path / "val36.hdf5"))
    assert [g["image_id"] for g in got] == ["9", "25", "30"]
    assert np.array_equal(got[1]["features"], recs[1]["features"][:5])
    assert got[0]["image_w"] is None  # no spatial_features: size unknown


def test_restricted_unpickler_refuses_globals(tmp_path: Path):
    sentinel = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode()  # os.system("touch ...")
    (tmp_path / "evil.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"evil.pkl: refusing to load os.system"):
        read_index(tmp_path / "evil.pkl")
    assert not sentinel.exists()
    np_index = pickle.dumps({1: np.int64(3)})  # numpy scalars need a global: refused too
    (tmp_path / "np.pkl").write_bytes(np_index)
    with pytest.raises(UnsafePickleError, match="numpy"):
        read_index(tmp_path / "np.pkl")
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({42: 0, 7: 1}, protocol=pickle.HIGHEST_PROTOCOL))
    assert read_index(tmp_path / "ok.pkl") == {"42": 0, "7": 1}
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(RegionFormatError, match="expected a dict"):
        read_index(tmp_path / "list.pkl")


def test_import_regions_into_store(tmp_path: Path):
    want = _lxmert_file(tmp_path / "a.tsv")
    stats = import_regions(tmp_path / "a.tsv", tmp_path / "store", storage="float16")
    assert (stats["written"], stats["already"], stats["min_boxes"], stats["max_boxes"]) == (
        3,
        0,
        5,
        36,
    )
    store = FeatureStore.open(tmp_path / "store", expect={"kind": "regions", "channels": 8})
    assert store.ids() == ["9", "25", "30"]  # COCO names keyed by their integer id
    rec = store["30"]
    assert (rec["image_w"], rec["image_h"]) == (427, 640)
    assert torch.equal(rec["boxes"], torch.from_numpy(want[2]["boxes"]))
    assert torch.equal(rec["objects_id"], torch.from_numpy(want[2]["objects_id"]))
    f16 = want[2]["features"].astype(np.float16).astype(np.float32)
    assert torch.equal(rec["features"], torch.from_numpy(f16))
    again = import_regions(tmp_path / "a.tsv", tmp_path / "store", storage="float16")
    assert (again["written"], again["already"]) == (0, 3)  # resumable

    _butd_file(tmp_path / "b.tsv", d=8)  # BUTD has no objects_id: another store's layout
    stats = import_regions([tmp_path / "b.tsv"], tmp_path / "butd", skip_bad=True)
    assert stats["written"] == 3 and stats["formats"] == ["butd"]
    assert FeatureStore.open(tmp_path / "butd").metadata["row_fields"] == {"boxes": ["float32", 4]}
