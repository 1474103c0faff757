"""36-view navigation features: the EnvDrop TSV and HAMT HDF5 formats both ways, into the store."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch

from cliptransfer.nav.view_features import (
    ViewFeatureError,
    ViewRecord,
    import_views,
    iter_view_hdf5,
    iter_view_tsv,
    write_view_tsv,
)
from cliptransfer.visual.store import FeatureStore, StoreError


def _records() -> list[ViewRecord]:
    a = np.arange(36 * 4, dtype=np.float32).reshape(36, 4)
    return [ViewRecord("scanA", "vp1", a), ViewRecord("scanA", "vp2", -a / 8)]


def test_tsv_round_trip_is_exact_and_in_envdrop_layout(tmp_path):
    path = tmp_path / "feats.tsv"
    assert write_view_tsv(path, _records()) == 2
    first = path.read_text().splitlines()[0].split("\t")
    assert first[:5] == ["scanA", "vp1", "640", "480", "60"]  # EnvDrop's columns, vfov in degrees
    flat = np.frombuffer(base64.b64decode(first[5]), dtype=np.float32)
    assert flat[:6].tolist() == [0, 1, 2, 3, 4, 5]  # view 0's 4 values, then view 1's: row-major
    back = list(iter_view_tsv(path))
    assert [(r.scan, r.viewpoint) for r in back] == [("scanA", "vp1"), ("scanA", "vp2")]
    assert all(np.array_equal(r.features, e.features) for r, e in zip(back, _records()))


@pytest.mark.parametrize(
    "row, message",
    [
        ("s\tv\t640\t480\t60\t!!!!\n", "line 2 (s v): features are not base64"),
        ("s\tv\t640\t480\t60\n", "line 2: 5 fields, expected 6"),
        ("s\tv\t640\t480\t60\t" + base64.b64encode(np.zeros(35, np.float32).tobytes()).decode()
         + "\n", "line 2 (s v): 35 floats do not make 36 views"),
    ],
)  # fmt: skip
def test_bad_tsv_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.tsv"
    write_view_tsv(path, _records()[:1])
    path.write_text(path.read_text() + row)
    with pytest.raises(ViewFeatureError, match=re.escape(f"bad.tsv: {message}")):
        list(iter_view_tsv(path))


def test_hdf5_with_logit_columns_and_import_into_the_store(tmp_path):
    import h5py

    feats = np.random.default_rng(0).standard_normal((36, 6)).astype(np.float32)
    with h5py.File(tmp_path / "views.hdf5", "w") as f:
        f["scanB_vp9"] = np.concatenate([feats, np.ones((36, 3), np.float32)], axis=1)  # + logits
    (rec,) = iter_view_hdf5(tmp_path / "views.hdf5", keep_dims=6)
    assert (rec.scan, rec.viewpoint) == ("scanB", "vp9") and np.array_equal(rec.features, feats)
    with pytest.raises(ViewFeatureError, match="9 columns < keep_dims=10"):
        list(iter_view_hdf5(tmp_path / "views.hdf5", keep_dims=10))
    stats = import_views([tmp_path / "views.hdf5"], tmp_path / "store", keep_dims=6)
    assert (stats["written"], stats["already"]) == (1, 0)
    again = import_views([tmp_path / "views.hdf5"], tmp_path / "store", keep_dims=6)
    assert (again["written"], again["already"]) == (0, 1)  # resumable
    store = FeatureStore.open(tmp_path / "store")
    assert store.metadata["kind"] == "views" and store.metadata["views"] == 36
    assert torch.equal(store["scanB_vp9"]["features"], torch.from_numpy(feats))


def test_views_store_refuses_another_view_count(tmp_path):
    meta = {"kind": "views", "views": 36, "channels": 4}
    with FeatureStore.create(tmp_path / "s", meta) as w:
        with pytest.raises(StoreError, match="35 feature rows but the store holds 36 views"):
            w.add("s_v", np.zeros((35, 4), np.float32))
    with pytest.raises(StoreError, match="views stores need metadata views"):
        FeatureStore.create(tmp_path / "t", {"kind": "views", "channels": 4})
