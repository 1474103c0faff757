"""Precomputed navigation tables over a set of scans, so that a batched environment steps with
array lookups instead of a simulator call per agent.

Every included viewpoint of the chosen scans gets a global id (scan order, then file order).
Per viewpoint: EnvDrop's candidates (`views.candidates`, independent of the agent's view but for
the heading offset, so stored once); per scan: geodesic distances and the first hop of the
networkx-exact shortest path between every pair (what EnvDrop's `self.paths[scan][a][b][1]` and
`self.distances[scan][a][b]` hold), as dense (n, n) blocks — 1.7 M pairs, ~20 MB, for all 90
Matterport scans where EnvDrop keeps per-environment dicts of every path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cliptransfer.nav.graph import NavGraph
from cliptransfer.nav.views import HEADING_COUNT, R2R_CAMERA, Camera, _sweep, view_angles
from cliptransfer.visual.store import FeatureStore, MissingFeatureError

__all__ = ["ANGLE_FEATURE_SIZE", "NUM_VIEWS", "NavTables", "angle_feature", "load_view_table"]

NUM_VIEWS = 3 * HEADING_COUNT
ANGLE_FEATURE_SIZE = 128  # EnvDrop's args.angle_feat_size
# EnvDrop's base heading: (viewIndex % 12) * math.radians(30); not 2*pi/12 * col (last bit).
_BASE_HEADING = np.array([c * math.radians(30) for c in range(HEADING_COUNT)], np.float64)


def angle_feature(heading: np.ndarray, elevation: np.ndarray, size: int = ANGLE_FEATURE_SIZE):
    """EnvDrop's `utils.angle_feature`: [sin h, cos h, sin e, cos e] tiled size/4 times,
    float32, over any leading shape: (...,) float64 radians -> (..., size)."""
    if size % 4:
        raise ValueError(f"angle feature size {size} is not a multiple of 4")
    h, e = np.asarray(heading, np.float64), np.asarray(elevation, np.float64)
    four = np.stack([np.sin(h), np.cos(h), np.sin(e), np.cos(e)], -1).astype(np.float32)
    return np.tile(four, (1,) * h.ndim + (size // 4,))


def _view_angle_table(size: int) -> np.ndarray:
    """(12, 36, size): EnvDrop's `get_all_point_angle_feature()`, per base view column the 36
    views' angle features relative to it (heading = view heading - base heading)."""
    heading = np.array([view_angles(ix)[0] for ix in range(NUM_VIEWS)], np.float64)
    elevation = np.array([view_angles(ix)[1] for ix in range(NUM_VIEWS)], np.float64)
    rel = heading[None, :] - _BASE_HEADING[:, None]
    return angle_feature(rel, np.broadcast_to(elevation, rel.shape), size)


@dataclass
class NavTables:
    """Array form of the graphs of some scans; see the module docstring. Ids are int64."""

    keys: list[tuple[str, str]]  # global id -> (scan, viewpoint)
    index: dict[tuple[str, str], int]
    scans: list[str]
    scan_of: np.ndarray  # (N,) scan number
    local: np.ndarray  # (N,) position within its scan's block
    block_start: np.ndarray  # (S,) global id of each scan's first viewpoint
    block_size: np.ndarray  # (S,)
    pair_start: np.ndarray  # (S,) offset of each scan's (n, n) block in the pair arrays
    pair_distance: np.ndarray  # (sum n^2,) float64 metres, inf when unreachable
    pair_next: np.ndarray  # (sum n^2,) global id of the first hop, -1 for a == b / unreachable
    cand_count: np.ndarray  # (N,)
    cand_target: np.ndarray  # (N, K) global id of the neighbour, -1 padding
    cand_point: np.ndarray  # (N, K) pointId: the view the neighbour is seen best from
    cand_state_heading: np.ndarray  # (N, K) float64 heading of that view
    cand_rel_heading: np.ndarray  # (N, K) float64 MatterSim rel_heading at that view
    cand_elevation: np.ndarray  # (N, K) float64 view elevation + rel_elevation
    view_angles: np.ndarray  # (12, 36, A) float32, per base column
    camera: Camera

    @classmethod
    def build(
        cls,
        graphs: Mapping[str, NavGraph],
        scans: Iterable[str] | None = None,
        camera: Camera = R2R_CAMERA,
        angle_size: int = ANGLE_FEATURE_SIZE,
    ) -> NavTables:
        scans = list(dict.fromkeys(scans if scans is not None else graphs))
        keys: list[tuple[str, str]] = []
        block_start, block_size = [], []
        for scan in scans:
            if scan not in graphs:
                raise KeyError(f"scan {scan} has no navigation graph")
            g = graphs[scan]
            block_start.append(len(keys))
            keys += [(scan, vp) for vp in g.viewpoints if g.included[vp]]
            block_size.append(len(keys) - block_start[-1])
        index = {k: i for i, k in enumerate(keys)}
        n_total = len(keys)
        sizes = np.array(block_size, np.int64)
        pair_start = np.concatenate([[0], np.cumsum(sizes**2)[:-1]]).astype(np.int64)
        pair_distance = np.full(int((sizes**2).sum()), np.inf, np.float64)
        pair_next = np.full(pair_distance.shape, -1, np.int64)
        scan_of = np.zeros(n_total, np.int64)
        local = np.zeros(n_total, np.int64)
        sweeps = []
        for s, scan in enumerate(scans):
            g, base, n = graphs[scan], block_start[s], block_size[s]
            scan_of[base : base + n] = s
            local[base : base + n] = np.arange(n)
            for a_local in range(n):
                a = keys[base + a_local][1]
                dist = g.distances_from(a)  # networkx order: pop order of Dijkstra
                pred = g._pred[a]
                first: dict[str, str] = {}
                row = pair_start[s] + a_local * n
                for b, d in dist.items():
                    b_local = index[(scan, b)] - base
                    pair_distance[row + b_local] = d
                    if b == a:
                        continue
                    first[b] = b if pred[b] == a else first[pred[b]]
                    pair_next[row + b_local] = index[(scan, first[b])]
                sweeps.append(_sweep(g, a, camera))
        k_max = max((len(sw) for sw in sweeps), default=0)
        count = np.array([len(sw) for sw in sweeps], np.int64)
        target = np.full((n_total, max(k_max, 1)), -1, np.int64)
        point = np.zeros_like(target)
        state_heading = np.zeros(target.shape, np.float64)
        rel_heading = np.zeros_like(state_heading)
        elevation = np.zeros_like(state_heading)
        for i, sw in enumerate(sweeps):
            scan = keys[i][0]
            for k, seen in enumerate(sw):
                target[i, k] = index[(scan, seen.viewpointId)]
                point[i, k] = seen.pointId
                state_heading[i, k] = seen.state_heading
                rel_heading[i, k] = seen.rel_heading
                elevation[i, k] = seen.state_elevation + seen.rel_elevation
        return cls(
            keys, index, scans, scan_of, local, np.array(block_start, np.int64), sizes,
            pair_start, pair_distance, pair_next, count, target, point, state_heading,
            rel_heading, elevation, _view_angle_table(angle_size), camera,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self, scan: str, viewpoints: Iterable[str]) -> np.ndarray:
        """Global ids of `viewpoints` of `scan`; KeyError naming the first unknown one."""
        out = []
        for vp in viewpoints:
            if (scan, vp) not in self.index:
                raise KeyError(f"viewpoint {vp} of scan {scan} is not an included viewpoint here")
            out.append(self.index[(scan, vp)])
        return np.array(out, np.int64)

    def pair_index(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Positions of the (a, b) pairs in `pair_distance` / `pair_next` (same scan only)."""
        s = self.scan_of[a]
        if np.any(s != self.scan_of[b]):
            raise ValueError("distance between viewpoints of different scans")
        return self.pair_start[s] + self.local[a] * self.block_size[s] + self.local[b]

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Geodesic metres from a to b, elementwise over global ids (NavGraph.distance)."""
        return self.pair_distance[self.pair_index(np.asarray(a), np.asarray(b))]

    def next_hop(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Global id of `shortest_path(a, b)[1]`; -1 where a == b or b is unreachable."""
        return self.pair_next[self.pair_index(np.asarray(a), np.asarray(b))]

    def candidate_headings(self, vp: np.ndarray, view_index: np.ndarray) -> np.ndarray:
        """(B, K) EnvDrop candidate `heading` relative to the agent's view column: (view
        heading - base heading) + rel_heading, in EnvDrop's order of operations."""
        base = _BASE_HEADING[np.asarray(view_index) % HEADING_COUNT]
        return (self.cand_state_heading[vp] - base[:, None]) + self.cand_rel_heading[vp]


_HALF_MAX = torch.finfo(torch.float16).max


def load_view_table(
    store: FeatureStore | str,
    tables: NavTables,
    *,
    dtype: torch.dtype = torch.float32,
    missing: str = "error",
    norm: float = 0.0,
) -> torch.Tensor:
    """(N, 36, D) view features of every viewpoint of `tables` from a "views" store keyed
    "{scan}_{viewpoint}", in `dtype`; `norm` > 0 rescales each view vector to that L2 norm
    (in float32, before the cast). `missing="zeros"` fills absent viewpoints with zeros (counted
    in the error otherwise); the default raises naming the first absent key and the store."""
    if missing not in ("error", "zeros"):
        raise ValueError(f"missing={missing!r}: use 'error' or 'zeros'")
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    kind = store.metadata.get("kind")
    if kind != "views":
        raise ValueError(f"feature store {store.root} holds {kind!r} features, not 'views'")
    views, channels = int(store.metadata["views"]), int(store.metadata["channels"])
    if views != NUM_VIEWS:
        raise ValueError(f"feature store {store.root} has {views} views per viewpoint, not 36")
    out = torch.zeros(len(tables), NUM_VIEWS, channels, dtype=dtype)
    absent = [f"{s}_{v}" for s, v in tables.keys if f"{s}_{v}" not in store]
    if absent and missing == "error":
        raise MissingFeatureError(
            f"{len(absent)} of {len(tables)} viewpoints have no features in {store.root} "
            f"(first: {absent[0]}); extract them or pass missing='zeros'"
        )
    for i, (scan, vp) in enumerate(tables.keys):
        key = f"{scan}_{vp}"
        if key in store:
            row = store[key]["features"].float()
            if norm > 0:
                row = torch.nn.functional.normalize(row, dim=-1) * norm
            if dtype == torch.float16 and (big := float(row.abs().max())) > _HALF_MAX:
                raise ValueError(
                    f"feature store {store.root}, {key}: a feature of magnitude {big:.4g} "
                    f"does not fit float16 (max {_HALF_MAX:g}): keep the table float32 or "
                    "bfloat16, or rescale the views (VLN: data.feature_norm)"
                )
            out[i] = row.to(dtype)
    return out
