"""MatterSim navigableLocations / newEpisode view snapping and EnvDrop candidates (nav/views.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cliptransfer.nav import R2R_CAMERA, candidates, navigable, start_view
from cliptransfer.nav.graph import load_graphs
from cliptransfer.nav.views import HEADING_INCREMENT, candidate_table, view_angles

D7N = "D7N2EKCX4Sj"
DHJ = "dhjEzFoUFzH"


@pytest.fixture(scope="module")
def graphs(shared_data):
    return load_graphs(shared_data / "r2r" / "connectivity", [D7N, DHJ])


def _key(loc):
    return math.sqrt(loc.rel_heading**2 + loc.rel_elevation**2)


def _t32(graph, a, b):
    return graph.position(b).astype(np.float32) - graph.position(a).astype(np.float32)


def _theta32(graph, a, b):
    t = _t32(graph, a, b)
    return math.atan2(float(t[0]), float(t[1]))


def _write_graph(folder, scan, points):
    """A star graph: point 0 joined to every other point, in the given (file) order."""
    recs = []
    for i, (name, (x, y, z)) in enumerate(points):
        free = [(i == 0) != (j == 0) for j in range(len(points))]
        pose = [1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, z, 0, 0, 0, 1]
        recs.append(dict(image_id=name, pose=pose, included=True, height=1.5, unobstructed=free))
    (folder / f"{scan}_connectivity.json").write_text(json.dumps(recs))
    return load_graphs(folder, [scan])[scan]


# --- start_view: MatterSim's discretised setHeadingElevation ------------------------------


@pytest.mark.parametrize(
    ("degrees", "view", "step"),
    [
        (0.0, 12, 0),
        (15.0, 13, 1),  # quotient exactly 0.5: lround goes away from zero (Python round -> 0)
        (45.0, 14, 2),  # exactly 1.5
        (-15.0, 12, 0),  # fmod -> -15 deg, +2pi -> 345 deg, 11.5 -> 12 -> wraps to 0
        (-345.0, 12, 0),  # 15 deg after wrapping, but 0.49999999999999944 -> 0
        (14.999, 12, 0),
        (15.001, 13, 1),
        (180.0, 18, 6),
        (359.0, 12, 0),
    ],
)
def test_start_view_rounding(degrees, view, step):
    assert start_view(math.radians(degrees)) == (view, step * HEADING_INCREMENT)


def test_start_view_wraps_just_below_two_pi():
    assert start_view(math.nextafter(2 * math.pi, 0.0)) == (12, 0.0)
    assert start_view(2 * math.pi) == (12, 0.0)
    assert start_view(-1e-300) == (12, 0.0)  # fmod keeps -0...1, +2pi rounds to 2pi -> step 12
    assert start_view(7 * math.pi) == (18, math.pi)


def test_view_angles():
    assert view_angles(0) == (0.0, -math.pi / 6)
    assert view_angles(13) == (math.radians(30), 0.0)
    assert view_angles(35) == (11 * (math.pi * 2 / 12), math.pi / 6)
    with pytest.raises(ValueError):
        view_angles(36)


# --- navigable -----------------------------------------------------------------------------


def test_navigable_matches_float64_geometry_and_sort(graphs):
    g = graphs[DHJ]
    vp = "75d325c4b2c34901a4f0a4729af01969"
    heading, elevation = math.radians(100), math.radians(-10)
    got = navigable(g, vp, heading, elevation)
    assert got == g.navigable(vp, heading, elevation)
    assert [_key(v) for v in got] == sorted(_key(v) for v in got)
    expected = set()
    p = g.position(vp)
    for nb in g.neighbors(vp):
        t = g.position(nb) - p
        rel_h = math.atan2(t[0], t[1]) - heading
        rel_h = (rel_h + math.pi) % (2 * math.pi) - math.pi
        if abs(rel_h) > math.radians(40) + 1e-6:
            continue
        expected.add(nb)
        (loc,) = [v for v in got if v.viewpointId == nb]
        assert loc.rel_heading == pytest.approx(rel_h, abs=1e-5)
        rel_e = math.atan2(t[2], math.hypot(t[0], t[1])) - elevation
        assert loc.rel_elevation == pytest.approx(rel_e, abs=1e-5)
        assert loc.rel_distance == pytest.approx(float(np.linalg.norm(t)), abs=1e-5)
    assert {v.viewpointId for v in got} == expected and len(got) == len(expected) >= 2


@pytest.mark.parametrize("side", [1, -1])
def test_navigable_half_hfov_boundary(graphs, side):
    # b3eb5df2 is 2.85 m from 75d325c4; put it at +-40 deg (the R2R camera's half hfov).
    g = graphs[DHJ]
    a, b = "75d325c4b2c34901a4f0a4729af01969", "b3eb5df2a5e54a718d376a10d39ec57a"
    theta = _theta32(g, a, b)
    half = R2R_CAMERA.vfov * R2R_CAMERA.width / R2R_CAMERA.height / 2.0
    assert half == pytest.approx(math.radians(40), abs=1e-15)

    def seen(angle):
        return [v for v in navigable(g, a, theta - side * angle, 0.0) if v.viewpointId == b]

    inside, outside = seen(half - 1e-5), seen(half + 1e-5)
    assert not outside and len(inside) == 1
    assert inside[0].rel_heading == pytest.approx(side * (half - 1e-5), abs=1e-6)
    # Exactly at 40 deg the float32 cosine decides (cos_angle >= cos_half_hfov): cos(40 deg)
    # is no float32, so the inclusive >= and a strict > cannot differ for this camera.
    cos_half = R2R_CAMERA.cos_half_hfov
    assert float(np.float32(cos_half)) != cos_half
    h = theta - side * half
    adj = math.pi / 2 - (h % (2 * math.pi))
    cx, cy = np.float32(math.cos(adj)), np.float32(math.sin(adj))
    t = _t32(g, a, b)
    inv = np.float32(1) / np.sqrt(t[0] * t[0] + t[1] * t[1])
    cos32 = float((t[0] * inv) * cx + (t[1] * inv) * cy)
    assert bool(seen(half)) == (cos32 >= cos_half)


def test_navigable_elevation_plays_no_part_in_visibility(graphs):
    g = graphs[DHJ]
    vp = "75d325c4b2c34901a4f0a4729af01969"
    for heading in (0.0, 1.0, 4.0):
        ids = [[v.viewpointId for v in navigable(g, vp, heading, e)] for e in (-1.2, 0.0, 1.2)]
        assert {frozenset(x) for x in ids} == {frozenset(ids[0])}


def test_navigable_float32_visibility_differs_from_float64(graphs):
    # accd0679 -> fb1d28b8 are 0.19 mm apart: float32 positions move the bearing by 7e-4 rad.
    g = graphs[D7N]
    a, b = "fb1d28b8329e4951b803c84c34d187fa", "accd06798cf84596ada8f0cbc36af696"
    t64 = g.position(b) - g.position(a)
    theta64, theta32 = math.atan2(t64[0], t64[1]), _theta32(g, a, b)
    assert abs(theta64 - theta32) > 5e-4
    # Half way between the two bearings' 40-deg edges: one precision sees b, the other not.
    heading = (theta64 + theta32) / 2 - math.radians(40)
    seen32 = theta32 - heading <= math.radians(40)
    assert seen32 != (theta64 - heading <= math.radians(40))
    got = [v for v in navigable(g, a, heading, 0.0) if v.viewpointId == b]
    assert bool(got) == seen32


def test_navigable_float32_distance(graphs):
    # Positions about 30 m from the origin: float32 rounding moves the length by 5e-6 m.
    g = graphs[DHJ]
    a, b = "f0a11e82cbe546348617a0b80243c0e2", "7633688a465b46baad4b5cfa4b5b01d9"
    t = _t32(g, a, b)
    d32 = float(np.sqrt((t[0] * t[0] + t[1] * t[1]) + t[2] * t[2]))
    d64 = float(np.linalg.norm(g.position(b) - g.position(a)))
    assert abs(d32 - d64) > 5e-6
    (loc,) = [v for v in navigable(g, a, _theta32(g, a, b), 0.0) if v.viewpointId == b]
    assert loc.rel_distance == d32 and loc.rel_heading == pytest.approx(0.0, abs=1e-6)


def test_navigable_near_coincident_viewpoints(graphs):
    # 75d325c4 and 939ad5f1 are 0.17 mm apart (bearing 142.43 deg, 20.1 deg up).
    g = graphs[DHJ]
    a, b = "75d325c4b2c34901a4f0a4729af01969", "939ad5f1388646acb6c050d862da1c28"
    views_seen = [
        ix for ix in range(36) if any(v.viewpointId == b for v in navigable(g, a, *view_angles(ix)))
    ]
    assert views_seen == [4, 5, 6, 16, 17, 18, 28, 29, 30]  # columns 120, 150, 180 deg
    (loc,) = [v for v in navigable(g, a, *view_angles(17)) if v.viewpointId == b]
    assert loc.rel_heading == pytest.approx(math.radians(142.4314079711347 - 150), abs=1e-6)
    assert loc.rel_elevation == pytest.approx(0.3507039571637827, abs=1e-6)
    assert loc.rel_distance == pytest.approx(0.00017488, abs=1e-8)  # float64: 0.00017464


def test_navigable_ties_keep_graph_order(tmp_path):
    pts = [("c", (0, 0, 0)), ("a", (-1, 2, 0)), ("b", (1, 2, 0))]
    ab = _write_graph(tmp_path, "ab", pts)
    ba = _write_graph(tmp_path, "ba", [pts[0], pts[2], pts[1]])
    got_ab, got_ba = navigable(ab, "c", 0.0, 0.0), navigable(ba, "c", 0.0, 0.0)
    assert _key(got_ab[0]) == _key(got_ab[1])  # an exact tie: +-atan(1/2)
    assert [v.viewpointId for v in got_ab] == ["a", "b"]
    assert [v.viewpointId for v in got_ba] == ["b", "a"]
    assert got_ab[0].rel_heading == pytest.approx(-math.atan(0.5), abs=1e-7)


# --- candidates ----------------------------------------------------------------------------


def test_candidates_first_appearance_and_strict_ties(tmp_path):
    pts = [("c", (0, 0, 0)), ("ne", (1, 1, 0)), ("a", (-1, 2, 0)), ("b", (1, 2, 0))]
    g = _write_graph(tmp_path, "s", pts)
    cands = g.candidates("c", 12)
    # a and b first show up together in view 0 (tied, graph order), ne first in view 1;
    # a's best view (23) comes after b's (13), yet a stays first.
    assert [(c.viewpointId, c.pointId, c.idx) for c in cands] == [
        ("a", 23, 1),
        ("b", 13, 1),
        ("ne", 13, 2),
    ]
    # ne sits at 45 deg: views 13 (30 deg) and 14 (60 deg) are exactly as far, 13 wins.
    k13 = [_key(v) for v in navigable(g, "c", *view_angles(13)) if v.viewpointId == "ne"]
    k14 = [_key(v) for v in navigable(g, "c", *view_angles(14)) if v.viewpointId == "ne"]
    assert k13 == k14 == [cands[2].distance]
    ne = cands[2]
    assert ne.normalized_heading == pytest.approx(math.pi / 4, abs=1e-7)
    assert ne.heading == ne.normalized_heading and ne.elevation == 0.0
    assert ne.rel_distance == pytest.approx(math.sqrt(2), abs=1e-6)
    # Another base view: heading = view heading - base + rel_heading.
    shifted = candidates(g, "c", 5)  # base column 5 -> 150 deg
    (loc,) = [v for v in navigable(g, "c", *view_angles(13)) if v.viewpointId == "ne"]
    assert shifted[2].heading == (math.radians(30) - 5 * math.radians(30)) + loc.rel_heading
    assert shifted[2].normalized_heading == ne.normalized_heading


def test_candidates_real_viewpoint(graphs):
    g = graphs[DHJ]
    vp = "75d325c4b2c34901a4f0a4729af01969"
    cands = candidates(g, vp, 17)
    assert sorted(c.viewpointId for c in cands) == sorted(g.neighbors(vp))
    first_seen = []
    sweeps = [navigable(g, vp, *view_angles(ix)) for ix in range(36)]
    for nav in sweeps:
        first_seen += [v.viewpointId for v in nav if v.viewpointId not in first_seen]
    assert [c.viewpointId for c in cands] == first_seen
    base = 5 * math.radians(30)
    for c in cands:
        loc = sweeps[c.pointId][c.idx - 1]
        assert loc.viewpointId == c.viewpointId and c.distance == _key(loc)
        keys = [_key(v) for nav in sweeps for v in nav if v.viewpointId == c.viewpointId]
        assert min(keys) == c.distance
        earlier = [
            _key(v) for nav in sweeps[: c.pointId] for v in nav if v.viewpointId == c.viewpointId
        ]
        assert all(k > c.distance for k in earlier)
        h, e = view_angles(c.pointId)
        assert c.heading == (h - base) + loc.rel_heading
        assert c.normalized_heading == h + loc.rel_heading
        assert c.elevation == e + loc.rel_elevation
        assert c.rel_distance == loc.rel_distance
    near = [c for c in cands if c.viewpointId == "939ad5f1388646acb6c050d862da1c28"]
    assert [(c.pointId, c.idx) for c in near] == [(29, 1)]  # 20 deg up: the +30 deg row wins


def test_candidate_table_matches_candidates(graphs):
    g = graphs[DHJ]
    vps = ["75d325c4b2c34901a4f0a4729af01969", "f0a11e82cbe546348617a0b80243c0e2"]
    table = candidate_table(g, vps)
    assert len(table) == 24
    assert table[(vps[0], 5)] == candidates(g, vps[0], 29)
    assert table[(vps[1], 0)] == candidates(g, vps[1], 0)


def test_robot_relative_coords_as_mattersim_tests_them(graphs):
    # MatterSim src/test/main.cpp "Robot Relative Coords": 200x100, vfov 45 deg (hfov 90);
    # target = curr + (sin h cos e, cos h cos e, sin e) * rel_distance, keys non-decreasing.
    from cliptransfer.nav.views import Camera

    camera = Camera(200, 100, math.radians(45))
    g = graphs[D7N]
    checked = 0
    for vp in [v for v in g.viewpoints if g.included[v]][:20]:
        curr = g.position(vp).astype(np.float32).astype(np.float64)
        for heading, elevation in [(0.3, -0.5), (2.0, 0.0), (4.5, 0.6)]:
            locs = navigable(g, vp, heading, elevation, camera)
            keys = [_key(v) for v in locs]
            assert keys == sorted(keys)
            for loc in locs:
                h, e = heading + loc.rel_heading, elevation + loc.rel_elevation
                offset = np.array(
                    [math.sin(h) * math.cos(e), math.cos(h) * math.cos(e), math.sin(e)]
                )
                target = curr + offset * loc.rel_distance
                assert np.allclose([loc.x, loc.y, loc.z], target, rtol=0, atol=1e-5)
                assert abs(loc.rel_heading) <= math.radians(45) + 1e-6
                checked += 1
    assert checked > 20


def test_val_unseen_first_step_is_a_candidate(shared_data):
    episodes = json.loads((shared_data / "r2r" / "R2R_val_unseen.json").read_text())
    scans = sorted({ep["scan"] for ep in episodes})
    gs = load_graphs(shared_data / "r2r" / "connectivity", scans)
    for ep in episodes:
        view, heading = start_view(ep["heading"])
        assert 12 <= view < 24 and heading == (view - 12) * HEADING_INCREMENT
        assert abs(math.remainder(ep["heading"] - heading, 2 * math.pi)) <= math.radians(15) + 1e-12
        cands = candidates(gs[ep["scan"]], ep["path"][0], view)
        assert ep["path"][1] in {c.viewpointId for c in cands}
