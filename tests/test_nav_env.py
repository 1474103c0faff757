"""The batched navigation environment (nav/tables.py, nav/env.py) against the graph, EnvDrop's
make_candidate / angle features / make_equiv_action, and the official metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cliptransfer.nav import Episode, evaluate_nav, load_graphs, load_r2r
from cliptransfer.nav.env import IGNORE_ACTION, NavEnv, turn_sequence
from cliptransfer.nav.tables import NavTables, angle_feature, load_view_table
from cliptransfer.nav.views import candidates, view_angles
from cliptransfer.visual.store import FeatureStore, MissingFeatureError

# a -> b (2 m north) -> c (2 m east) -> d (2 m north, 2 m up); e hangs off b to the west.
POINTS = {"a": (0, 0, 0), "b": (0, 2, 0), "c": (2, 2, 0), "d": (2, 4, 2), "e": (-2, 2, 0)}
EDGES = {("a", "b"), ("b", "c"), ("c", "d"), ("b", "e")}


@pytest.fixture()
def house(tmp_path):
    names = list(POINTS)
    recs = []
    for a in names:
        x, y, z = POINTS[a]
        free = [(a, b) in EDGES or (b, a) in EDGES for b in names]
        pose = [1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, z, 0, 0, 0, 1]
        recs.append(dict(image_id=a, pose=pose, included=True, height=1.5, unobstructed=free,
                         visible=free))  # fmt: skip
    (tmp_path / "h_connectivity.json").write_text(json.dumps(recs))
    graphs = load_graphs(tmp_path, ["h"])
    tables = NavTables.build(graphs)
    features = torch.randn(len(tables), 36, 8, generator=torch.Generator().manual_seed(0))
    return graphs, tables, features


def _episode(path, heading=0.0, instr_id="1_0"):
    return Episode(instr_id, "h", 1, list(path), heading, "walk")


def test_turn_sequence_is_make_equiv_action():
    assert turn_sequence(15, 24) == [27, 28, 29, 30, 31, 32, 33, 34, 35, 24]  # up, then right
    assert turn_sequence(24, 3) == [12, 0, 1, 2, 3]  # down twice, then right
    assert turn_sequence(14, 13) == [15, 16, 17, 18, 19, 20, 21, 22, 23, 12, 13]  # right only
    assert turn_sequence(7, 7) == []


def test_teacher_rollout_trajectory_and_turns(house):
    graphs, tables, features = house
    env = NavEnv(tables, features)
    ob = env.reset([_episode("abcd")])
    h = [view_angles(ix)[0] for ix in range(12)]
    assert ob.view_index.tolist() == [12] and ob.distance.tolist() == [
        graphs["h"].distance("a", "d")
    ]
    names = [tables.keys[i][1] for i in ob.cand_viewpoint[0].tolist()]
    assert names == ["b"] and ob.teacher.tolist() == [0]
    ob = env.step(ob.teacher)  # to b, seen best from view 12: no turn
    names = [tables.keys[i][1] for i in ob.cand_viewpoint[0, : ob.cand_count[0]].tolist()]
    assert sorted(names) == ["a", "c", "e"]
    assert names[ob.teacher[0]] == "c"
    ob = env.step(ob.teacher)  # to c at 90 deg: right, right, right, move
    assert ob.view_index.tolist() == [15]
    ob = env.step(ob.teacher)  # to d, 45 deg up: up to row +30, right x9 to column 0, move
    assert ob.view_index.tolist() == [24] and ob.teacher.tolist() == [int(ob.cand_count[0])]
    assert ob.distance.tolist() == [0.0]
    ob = env.step(ob.teacher)  # STOP
    assert env.done and ob.ended.tolist() == [True] and ob.teacher.tolist() == [IGNORE_ACTION]
    up = math.pi / 6
    expected = (
        [["a", 0.0, 0.0], ["b", 0.0, 0.0]]
        + [["b", h[k], 0.0] for k in (1, 2, 3)]
        + [["c", h[3], 0.0], ["c", h[3], up]]
        + [["c", h[k % 12], up] for k in range(4, 13)]
        + [["d", 0.0, up]]
    )
    (traj,) = env.trajectories()
    assert traj == {"instr_id": "1_0", "trajectory": expected}
    metrics, _ = evaluate_nav([_episode("abcd")], [traj], graphs)
    assert metrics["success_rate"] == metrics["spl"] == 1.0 and metrics["nav_error"] == 0.0


def test_observation_features_and_angles(house):
    graphs, tables, features = house
    env = NavEnv(tables, features)
    ob = env.reset([_episode("bc", heading=math.radians(100)), _episode("ab", instr_id="2_0")])
    assert ob.view_index.tolist() == [15, 12]  # 100 deg snaps to column 3
    assert torch.equal(ob.views, features[ob.viewpoint])
    before = ob.viewpoint.clone()
    env.step([0, 0])  # an observation is a snapshot: stepping does not move its viewpoints
    assert torch.equal(ob.viewpoint, before)
    for i in range(2):
        for k in range(int(ob.cand_count[i])):
            vp, ix = int(ob.viewpoint[i]), int(tables.cand_point[ob.viewpoint[i], k])
            assert torch.equal(ob.cand_views[i, k], features[vp, ix])
    assert ob.cand_mask.tolist() == [[True, True, True], [True, False, False]]
    assert not ob.cand_angles[1, 1:].any()  # padding is zero
    # EnvDrop's get_point_angle_feature(baseViewId=15) for view 0: heading 0 - 3 * 30 deg.
    h, e = 0.0 - 3 * math.radians(30), -math.pi / 6
    four = [math.sin(h), math.cos(h), math.sin(e), math.cos(e)]
    assert ob.view_angles[0, 0].tolist() == np.float32(four * 32).tolist()
    # Candidate angle feature: make_candidate's heading relative to the agent's column.
    cands = candidates(graphs["h"], "b", 15)
    for k, c in enumerate(cands):
        assert tables.keys[int(ob.cand_viewpoint[0, k])][1] == c.viewpointId
        want = angle_feature(np.array(c.heading), np.array(c.elevation))
        assert ob.cand_angles[0, k].numpy().tolist() == want.tolist()


def test_stop_max_steps_and_bad_actions(house):
    _, tables, features = house
    env = NavEnv(tables, features, max_steps=2)
    eps = [_episode("abcd"), _episode("ab", instr_id="2_0"), _episode("ab", instr_id="3_0")]
    ob = env.reset(eps)
    with pytest.raises(ValueError, match="action 5 with 1 candidates"):
        env.step([5, 0, 0])
    with pytest.raises(ValueError, match="2 actions for 3"):
        env.step([0, 0])
    ob = env.step([0, -1, 1])  # move, stop by -1, stop by the candidate count
    assert ob.ended.tolist() == [False, True, True]
    assert ob.teacher[1:].tolist() == [IGNORE_ACTION, IGNORE_ACTION]
    ob = env.step([0, 7, 7])  # ended episodes ignore their actions; max_steps ends the rest
    assert env.done
    trajs = env.trajectories()
    assert [len(t["trajectory"]) for t in trajs] == [6, 1, 1]  # a, b, 3 turns, c
    assert trajs[0]["trajectory"][-1][0] == "c"


def test_reset_names_the_episode_with_an_unknown_viewpoint(house):
    _, tables, features = house
    env = NavEnv(tables, features)
    with pytest.raises(KeyError, match="episode 9_0: viewpoint zz of scan h"):
        env.reset([_episode("a", instr_id="1_0"), _episode(["a", "zz"], instr_id="9_0")])
    with pytest.raises(ValueError, match=r"expected \(5, 36, D\)"):
        NavEnv(tables, features[:3])


def test_load_view_table(house, tmp_path):
    _, tables, _ = house
    meta = {"kind": "views", "views": 36, "channels": 4, "dtype": "float32"}
    writer = FeatureStore.create(tmp_path / "store", meta)
    rows = {vp: np.full((36, 4), i, np.float32) for i, (_, vp) in enumerate(tables.keys)}
    for vp in "abcd":
        writer.add(f"h_{vp}", rows[vp])
    writer.close()
    with pytest.raises(MissingFeatureError, match=r"1 of 5 viewpoints .*\(first: h_e\)"):
        load_view_table(tmp_path / "store", tables)
    table = load_view_table(tmp_path / "store", tables, missing="zeros")
    assert table.shape == (5, 36, 4)
    assert table[tables.index[("h", "c")]].unique().tolist() == [2.0]
    assert not table[tables.index[("h", "e")]].any()
    # Rows rescaled to an L2 norm (each row is (c, c, c, c): norm 2c -> every entry 10 / 2),
    # stored half; an environment over a half table observes float32.
    half = load_view_table(tmp_path / "store", tables, missing="zeros", norm=10.0,
                           dtype=torch.float16)  # fmt: skip
    assert half.dtype == torch.float16
    assert half[tables.index[("h", "c")]].unique().tolist() == [5.0]
    assert not half[tables.index[("h", "e")]].any()  # zeros stay zero (no 0 / 0)
    ob = NavEnv(tables, half).reset([_episode("abc")])
    assert ob.views.dtype == ob.cand_views.dtype == torch.float32
    # A value beyond float16's range (65504) is refused, naming the view; bfloat16 holds it.
    writer = FeatureStore.create(tmp_path / "big", meta)
    for vp in "abcde":
        writer.add(f"h_{vp}", rows[vp] * 3e4)  # h_c: 6e4 fits, h_d: 9e4 does not
    writer.close()
    with pytest.raises(ValueError, match=r"big, h_d: a feature of magnitude 9e\+04 does not fit"):
        load_view_table(tmp_path / "big", tables, dtype=torch.float16)
    assert load_view_table(tmp_path / "big", tables, dtype=torch.bfloat16).isfinite().all()


# --- real Matterport graphs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def val_unseen(shared_data):
    r2r = shared_data / "r2r"
    eps = load_r2r(r2r / "R2R_val_unseen.json")
    scans = sorted({e.scan for e in eps})
    graphs = load_graphs(r2r / "connectivity", scans)
    return eps, graphs, NavTables.build(graphs, scans)


def test_tables_equal_graph_paths_and_make_candidate(val_unseen):
    _, graphs, tables = val_unseen
    scan = tables.scans[0]
    g = graphs[scan]
    ids = [i for i, (s, _) in enumerate(tables.keys) if s == scan]
    a = np.repeat(ids, len(ids))
    b = np.tile(ids, len(ids))
    dist, nxt = tables.distance(a, b), tables.next_hop(a, b)
    for i, j, d, n in zip(a, b, dist, nxt, strict=True):
        va, vb = tables.keys[i][1], tables.keys[j][1]
        assert d == g.distance(va, vb)
        assert n == (-1 if i == j else tables.index[(scan, g.shortest_path(va, vb)[1])])
    for view in (0, 12, 17, 35):
        heading = tables.candidate_headings(np.array(ids), np.full(len(ids), view))
        for row, i in enumerate(ids):
            cands = candidates(g, tables.keys[i][1], view)
            assert tables.cand_count[i] == len(cands)
            for k, c in enumerate(cands):
                assert tables.keys[tables.cand_target[i, k]][1] == c.viewpointId
                assert tables.cand_point[i, k] == c.pointId
                assert heading[row, k] == c.heading  # bit-exact
                assert tables.cand_elevation[i, k] == c.elevation


def test_teacher_follows_shortest_paths_on_real_val_unseen(val_unseen):
    eps, graphs, tables = val_unseen
    env = NavEnv(tables, torch.zeros(len(tables), 36, 1))
    results = []
    for start in range(0, len(eps), 256):
        ob = env.reset(eps[start : start + 256])
        while not env.done:
            ob = env.step(ob.teacher.clamp(min=0))
        results += env.trajectories()
    for ep, res in zip(eps, results, strict=True):
        vps = [s[0] for s in res["trajectory"]]
        visited = [v for k, v in enumerate(vps) if k == 0 or v != vps[k - 1]]
        assert visited == graphs[ep.scan].shortest_path(ep.start, ep.goal), ep.instr_id
    metrics, _ = evaluate_nav(eps, results, graphs)
    assert metrics["success_rate"] == metrics["spl"] == 1.0
    assert metrics["nav_error"] == 0.0
