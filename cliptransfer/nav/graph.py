"""Matterport3D navigation graphs, read from the `connectivity/<scan>_connectivity.json` files as
Matterport3DSimulator's `load_nav_graphs` reads them.

An edge joins two viewpoints iff both are `included` and the first lists the second as
`unobstructed`; its weight is the Euclidean distance of the pose translations (pose[3], pose[7],
pose[11]). Geodesic distances and paths follow networkx's Dijkstra (the official code's
`all_pairs_dijkstra_path(_length)`): distances summed from the source in path order, a node's
predecessor replaced only by a strictly shorter path, equal distances popped first-in first-out.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cliptransfer.fileio import read_json

__all__ = ["ConnectivityError", "NavGraph", "load_graphs", "read_scans"]


class ConnectivityError(ValueError):
    """A connectivity file that does not fit the Matterport format; names the file and record."""


@dataclass
class NavGraph:
    scan: str
    # Every viewpoint of the file, in file order (MatterSim's order), included or not.
    viewpoints: list[str]
    poses: dict[str, np.ndarray]  # (4, 4) float64, row-major from the 16 floats
    heights: dict[str, float]
    included: dict[str, bool]
    # Neighbours along edges, in file order of the `unobstructed` row: (viewpoint, metres).
    adjacency: dict[str, list[tuple[str, float]]]
    _dist: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    _pred: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def position(self, viewpoint: str) -> np.ndarray:
        """(x, y, z) of the camera, float64 as in the file (pose[3], pose[7], pose[11])."""
        return self.poses[self._known(viewpoint)][:3, 3]

    def neighbors(self, viewpoint: str) -> list[str]:
        return [v for v, _ in self.adjacency[self._known(viewpoint)]]

    def navigable(self, viewpoint: str, heading: float, elevation: float = 0.0, camera=None):
        """MatterSim's `navigableLocations[1:]`; see `cliptransfer.nav.views.navigable`."""
        from cliptransfer.nav import views

        return views.navigable(self, viewpoint, heading, elevation, camera or views.R2R_CAMERA)

    def candidates(self, viewpoint: str, view_index: int, camera=None):
        """EnvDrop's `make_candidate`; see `cliptransfer.nav.views.candidates`."""
        from cliptransfer.nav import views

        return views.candidates(self, viewpoint, view_index, camera or views.R2R_CAMERA)

    def __contains__(self, viewpoint: object) -> bool:
        return viewpoint in self.poses

    def _known(self, viewpoint: str) -> str:
        if viewpoint not in self.poses:
            raise KeyError(f"viewpoint {viewpoint!r} is not in scan {self.scan}")
        return viewpoint

    def _dijkstra(self, source: str) -> None:
        # networkx's _dijkstra_multisource with one source: FIFO among equal distances (the
        # counter), a node's path replaced only by a strictly shorter one.
        dist: dict[str, float] = {}
        seen = {source: 0.0}
        pred: dict[str, str] = {}
        count = itertools.count()
        fringe = [(0.0, next(count), source)]
        while fringe:
            d, _, v = heapq.heappop(fringe)
            if v in dist:
                continue
            dist[v] = d
            for u, w in self.adjacency[v]:
                vu = d + w
                if u in dist:
                    continue
                if u not in seen or vu < seen[u]:
                    seen[u] = vu
                    pred[u] = v
                    heapq.heappush(fringe, (vu, next(count), u))
        self._dist[source], self._pred[source] = dist, pred

    def distance(self, a: str, b: str) -> float:
        """Geodesic distance in metres (inf when b is unreachable from a)."""
        self._known(b)
        if self._known(a) not in self._dist:
            self._dijkstra(a)
        return self._dist[a].get(b, math.inf)

    def shortest_path(self, a: str, b: str) -> list[str]:
        """Viewpoints from a to b inclusive; ValueError when b is unreachable."""
        if math.isinf(self.distance(a, b)):
            raise ValueError(f"scan {self.scan}: no path from {a} to {b}")
        path, pred = [b], self._pred[a]
        while path[-1] != a:
            path.append(pred[path[-1]])
        return path[::-1]

    def distances_from(self, a: str) -> dict[str, float]:
        """Every reachable viewpoint's geodesic distance from `a`."""
        self.distance(a, a)
        return dict(self._dist[a])


def _parse(scan: str, path: Path) -> NavGraph:
    data = read_json(path, what="Matterport connectivity")
    if not isinstance(data, list):
        raise ConnectivityError(f"{path}: expected a list of viewpoint records")
    n = len(data)
    viewpoints, poses, heights, included = [], {}, {}, {}
    for i, rec in enumerate(data):
        try:
            vp = rec["image_id"]
            pose = np.asarray(rec["pose"], dtype=np.float64)
            if pose.shape != (16,):
                raise ValueError(f"pose has {pose.size} values, expected 16")
            if len(rec["unobstructed"]) != n:
                raise ValueError(f"unobstructed has {len(rec['unobstructed'])} entries, not {n}")
            viewpoints.append(vp)
            poses[vp] = pose.reshape(4, 4)
            heights[vp] = float(rec.get("height", math.nan))
            included[vp] = bool(rec["included"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConnectivityError(f"{path}: record {i}: {type(e).__name__}: {e}") from None
    adjacency: dict[str, list[tuple[str, float]]] = {vp: [] for vp in viewpoints}
    for i, rec in enumerate(data):
        a = viewpoints[i]
        if not included[a]:
            continue
        for j, free in enumerate(rec["unobstructed"]):
            b = viewpoints[j]
            if free and included[b]:
                pa, pb = poses[a][:3, 3], poses[b][:3, 3]
                w = math.sqrt(sum((float(pa[k]) - float(pb[k])) ** 2 for k in range(3)))
                adjacency[a].append((b, w))
    # The official graph is undirected (nx.Graph): an edge listed on one side only joins both.
    for a in viewpoints:
        for b, w in adjacency[a]:
            if all(x != a for x, _ in adjacency[b]):
                adjacency[b].append((a, w))
    return NavGraph(scan, viewpoints, poses, heights, included, adjacency)


def read_scans(connectivity_dir: str | Path) -> list[str]:
    """The scan ids of `scans.txt`, or of the connectivity files when it is absent."""
    root = Path(connectivity_dir)
    listed = root / "scans.txt"
    if listed.is_file():
        return [s.strip() for s in listed.read_text().splitlines() if s.strip()]
    return sorted(
        p.name.removesuffix("_connectivity.json") for p in root.glob("*_connectivity.json")
    )


def load_graphs(
    connectivity_dir: str | Path, scans: Iterable[str] | None = None
) -> dict[str, NavGraph]:
    """{scan: NavGraph} of `scans` (default: every scan of scans.txt)."""
    root = Path(connectivity_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"connectivity folder {root} not found")
    out = {}
    for scan in scans if scans is not None else read_scans(root):
        path = root / f"{scan}_connectivity.json"
        if not path.is_file():
            raise FileNotFoundError(f"scan {scan}: {path} not found")
        out[scan] = _parse(scan, path)
    return out
