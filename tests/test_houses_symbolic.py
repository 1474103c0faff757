"""Symbolic view features of the houses: hand-worked values on a one-room house, and the store
for a preset matches its connectivity and the features computed from the floor plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliptransfer.nav import load_graphs
from cliptransfer.visual.store import FeatureStore
from cliptransfer.worlds.houses import prepare_houses, sample_houses
from cliptransfer.worlds.houses.layout import House, Landmark, Room, Viewpoint, Wall
from cliptransfer.worlds.houses.symbolic import (
    SYMBOLIC_CHANNELS,
    prepare_symbolic_views,
    symbolic_view_features,
)


def _one_room(y_viewpoint: float) -> House:
    """A 6 x 6 m kitchen; a red star on the north wall (3, 6) facing south; a viewpoint at
    (3, y_viewpoint)."""
    walls = [Wall(0, 0, 6, 0, -1, 0), Wall(6, 0, 6, 6, -1, 0), Wall(6, 6, 0, 6, -1, 0),
             Wall(0, 6, 0, 0, -1, 0)]  # fmt: skip
    star = Landmark("star", "red", False, 0, 3.0, 6.0, 1.35, 1.0, 0.0, 0.0, -1.0)
    vp = Viewpoint("v0", 3.0, y_viewpoint, 1.5, 1.5, 0.0, 0)
    return House("s", [Room("kitchen", 0, 0)], walls, [], [star], [vp])


def test_channels_hand_worked_on_one_room():
    f = symbolic_view_features(_one_room(1.5), 0)  # the star 4.5 m due north
    assert f.shape == (36, 69) and len(SYMBOLIC_CHANNELS) == 69
    ch = {name: i for i, name in enumerate(SYMBOLIC_CHANNELS)}
    assert (f[:, ch["room:kitchen"]] == 1).all() and f[:, : ch["color:red"]].sum() == 36
    red, star, pair = ch["color:red"], ch["shape:star"], ch["red star"]
    # Horizon row (views 12..23 at heading 0, 30, ... deg): weight 1 - 4.5 / 9 = 0.5 where the
    # star's bearing (0) is within the 37.6 deg half field of view: headings 0, 30 and 330.
    for ix, w in [(12, 0.5), (13, 0.5), (23, 0.5), (14, 0.0), (18, 0.0)]:
        assert f[ix, [red, star, pair]].tolist() == [w, w, w], ix
    assert f[0, red] == 0.25 and f[24, pair] == 0.25  # the +-30 deg rows: halved
    assert f[:, ch["striped"]].sum() == 0
    # Nothing else: the room (36 views) plus three channels of 3 horizon + 6 off-horizon views.
    assert f.sum() == pytest.approx(36 + 3 * (3 * 0.5 + 6 * 0.25))
    behind = symbolic_view_features(_one_room(5.9), 0)  # 0.1 m in front of its wall: unseen
    assert behind[:, red].sum() == 0
    far = symbolic_view_features(_one_room(5.5), 0)
    assert far[12, red] == pytest.approx(1 - 0.5 / 9)


def test_store_of_a_preset(tmp_path):
    houses = prepare_houses(tmp_path / "h", "tiny", seed=0, workers=1)
    out = prepare_symbolic_views(tmp_path / "views", "tiny", seed=0)
    store = FeatureStore.open(out)
    graphs = load_graphs(houses / "r2r" / "connectivity")
    assert len(store) == sum(len(g.viewpoints) for g in graphs.values())
    house = sample_houses("tiny", 0)[1]
    i = len(house.viewpoints) // 2
    got = store[f"{house.scan}_{house.viewpoints[i].id}"]["features"].numpy()
    np.testing.assert_array_equal(got, symbolic_view_features(house, i))
    assert math.isclose(float(got[:, :6].sum()), 36.0)
    assert prepare_symbolic_views(tmp_path / "views", "tiny", seed=0) == out  # cached
