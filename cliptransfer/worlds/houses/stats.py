"""Statistics of the Shapes houses, for docs/houses.md and the manifest: graph shape against the
real Matterport graphs, instruction lengths per language, landmarks per instruction, and how
often turn words alone would get a walker to the goal (the share a no-vision agent could follow).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np

from cliptransfer.nav.graph import NavGraph
from cliptransfer.worlds.houses.instructions import Step
from cliptransfer.worlds.houses.layout import wrap_angle

__all__ = ["graph_stats", "plan_stats", "summarize", "turn_word_walk"]

_TURN = {"left": -math.pi / 2, "right": math.pi / 2, "around": math.pi}
SUCCESS_M = 3.0


def graph_stats(graphs: Mapping[str, NavGraph]) -> dict:
    """Viewpoints per scan, degree histogram and edge lengths of included viewpoints."""
    sizes, degrees, lengths = [], [], []
    for g in graphs.values():
        vps = [v for v in g.viewpoints if g.included[v]]
        sizes.append(len(vps))
        for v in vps:
            degrees.append(len(g.adjacency[v]))
            lengths += [w for _, w in g.adjacency[v]]
    hist = Counter(min(d, 9) for d in degrees)
    total = len(degrees)
    return {
        "scans": len(sizes),
        "viewpoints_per_scan": round(float(np.mean(sizes)), 1),
        "degree_mean": round(float(np.mean(degrees)), 2),
        "degree_share": {
            ("9+" if d == 9 else str(d)): round(hist[d] / total, 3) for d in range(10) if hist[d]
        },  # fmt: skip
        "edge_m_p10_p50_p90": [round(float(x), 2) for x in np.percentile(lengths, [10, 50, 90])],
    }


def turn_word_walk(graph: NavGraph, path: list[str], heading: float, plan: list[Step]) -> bool:
    """Whether a walker that hears only the plan's turn words reaches the goal (< 3 m): it turns
    as told, then keeps going to the neighbour closest to straight ahead (within 60 deg): 2 moves
    before each next turn word, up to 6 after the last one (or until nothing is ahead), then
    stops."""
    turns = [_TURN[s.direction] for s in plan if s.kind in ("turn", "turn_at") and s.direction]
    here, facing = path[0], heading
    segments = [0.0, *turns]  # the first stretch starts straight on
    for k, turn in enumerate(segments):
        facing = wrap_angle(facing + turn)
        for _ in range(6 if k == len(segments) - 1 else 2):
            best, best_off = None, math.radians(60)
            p = graph.position(here)
            for v in graph.neighbors(here):
                q = graph.position(v)
                off = abs(wrap_angle(math.atan2(q[0] - p[0], q[1] - p[1]) - facing))
                if off < best_off:
                    best, best_off = v, off
            if best is None:
                break
            q = graph.position(best)
            facing = math.atan2(q[0] - p[0], q[1] - p[1])
            here = best
    return graph.distance(here, path[-1]) < SUCCESS_M


def plan_stats(plan: list[Step]) -> dict[str, int]:
    return {
        "landmarks": sum(s.ref is not None for s in plan),
        "turns": sum(s.kind in ("turn", "turn_at") for s in plan),
        "rooms": sum(s.room is not None for s in plan),
    }


def summarize(rows: list[dict]) -> dict:
    """Per dataset and language: instructions, mean words, landmarks, turns and path length, and
    the share of instructions whose turn words alone reach the goal."""
    out: dict[str, dict] = {}
    for key in sorted({(r["dataset"], r["language"]) for r in rows}):
        sel = [r for r in rows if (r["dataset"], r["language"]) == key]
        out[f"{key[0]} {key[1]}"] = {
            "instructions": len(sel),
            "words_mean": round(float(np.mean([r["words"] for r in sel])), 1),
            "landmarks_mean": round(float(np.mean([r["landmarks"] for r in sel])), 2),
            "turns_mean": round(float(np.mean([r["turns"] for r in sel])), 2),
            "path_vps_mean": round(float(np.mean([r["path_vps"] for r in sel])), 2),
            "path_m_mean": round(float(np.mean([r["path_m"] for r in sel])), 2),
            "turn_words_reach_goal": round(
                float(np.mean([r["turn_words_reach_goal"] for r in sel])), 3
            ),  # fmt: skip
        }
    return out
