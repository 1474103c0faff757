"""Matterport navigation graphs: the official edge rule, geodesic distances and paths, on the real
connectivity of all 90 scans and on small graphs worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cliptransfer.nav import ConnectivityError, load_graphs, read_scans


def _pose(x: float, y: float, z: float = 1.5) -> list[float]:
    return [1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, z, 0, 0, 0, 1]


def _write(root: Path, scan: str, points: list[tuple[float, float]], free: list[list[int]],
           included: list[bool] | None = None) -> None:  # fmt: skip
    included = included or [True] * len(points)
    records = [
        {"image_id": f"v{i}", "pose": _pose(x, y), "included": included[i], "height": 1.5,
         "visible": [bool(f) for f in free[i]], "unobstructed": [bool(f) for f in free[i]]}
        for i, (x, y) in enumerate(points)
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{scan}_connectivity.json").write_text(json.dumps(records))


def test_edge_rule_weights_and_fifo_ties(tmp_path):
    # v0 (0,0) - v1 (3,4) - v3 (6,0) and v0 - v2 (3,-4) - v3: two equal 10 m paths; v4 excluded.
    pts = [(0, 0), (3, 4), (3, -4), (6, 0), (1, 0)]
    free = [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    _write(tmp_path, "s", pts, free, included=[True, True, True, True, False])
    g = load_graphs(tmp_path, ["s"])["s"]
    assert g.adjacency["v0"] == [("v1", 5.0), ("v2", 5.0)]  # v4 is not included: no edge
    assert g.neighbors("v4") == []
    assert g.distance("v0", "v3") == 10.0 and g.distance("v3", "v0") == 10.0
    assert g.shortest_path("v0", "v3") == ["v0", "v1", "v3"]  # the first-pushed of equals wins
    assert math.isinf(g.distance("v0", "v4"))
    with pytest.raises(ValueError, match="no path from v0 to v4"):
        g.shortest_path("v0", "v4")
    with pytest.raises(KeyError, match="'nope' is not in scan s"):
        g.distance("v0", "nope")


def test_one_sided_unobstructed_is_an_undirected_edge(tmp_path):
    _write(tmp_path, "s", [(0, 0), (2, 0)], [[0, 1], [0, 0]])
    g = load_graphs(tmp_path, ["s"])["s"]
    assert g.distance("v1", "v0") == 2.0  # as nx.Graph.add_edge in the official loader


def test_bad_connectivity_names_file_and_record(tmp_path):
    _write(tmp_path, "s", [(0, 0), (2, 0)], [[0, 1], [1, 0]])
    path = tmp_path / "s_connectivity.json"
    records = json.loads(path.read_text())
    records[1]["pose"] = records[1]["pose"][:12]
    path.write_text(json.dumps(records))
    with pytest.raises(ConnectivityError, match=r"s_connectivity.json: record 1: .*12 values"):
        load_graphs(tmp_path, ["s"])
    with pytest.raises(FileNotFoundError, match="scan t: .*t_connectivity.json not found"):
        load_graphs(tmp_path, ["t"])


def test_real_graphs_and_r2r_distances(shared_data):
    root = shared_data / "r2r" / "connectivity"
    scans = read_scans(root)
    assert len(scans) == 90
    graphs = load_graphs(root)
    g = graphs["17DRP5sb8fy"]
    records = json.loads((root / "17DRP5sb8fy_connectivity.json").read_text())
    assert g.viewpoints == [r["image_id"] for r in records] and len(g.viewpoints) == 48
    # One edge by hand: the Euclidean distance of the pose translations.
    a = records[0]
    j = next(j for j, f in enumerate(a["unobstructed"]) if f and records[j]["included"])
    b = records[j]
    expected = math.dist([a["pose"][3], a["pose"][7], a["pose"][11]],
                         [b["pose"][3], b["pose"][7], b["pose"][11]])  # fmt: skip
    assert dict(g.adjacency[a["image_id"]])[b["image_id"]] == pytest.approx(expected, abs=1e-12)
    # R2R's `distance` is its path's length rounded to 2 decimals, on every val_unseen path.
    episodes = json.loads((shared_data / "r2r" / "R2R_val_unseen.json").read_text())
    for e in episodes:
        hops = zip(e["path"], e["path"][1:])
        assert sum(graphs[e["scan"]].distance(u, v) for u, v in hops) == pytest.approx(
            e["distance"], abs=0.0051
        )
        start, goal = e["path"][0], e["path"][-1]
        sp = graphs[e["scan"]].shortest_path(start, goal)
        walked = sum(graphs[e["scan"]].distance(u, v) for u, v in zip(sp, sp[1:]))
        assert walked == pytest.approx(graphs[e["scan"]].distance(start, goal), abs=1e-9)
