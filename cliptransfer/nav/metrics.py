"""Navigation metrics, as Matterport3DSimulator's tasks/R2R/eval.py and google-research's r4r.

Per instruction, with d(a, b) the geodesic (graph shortest-path) distance from a to b, the
trajectory's viewpoints t_0..t_n, the reference path r_0..r_m (goal r_m):

- nav_error = d(t_n, r_m); oracle_error = min_i d(t_i, r_m)                          (eval.py)
- success = nav_error < 3.0; oracle_success = oracle_error < 3.0          (eval.py error_margin)
- length = sum_i d(t_{i-1}, t_i) (in-place turns add 0)                                 (eval.py)
- spl = success * L / max(length, L), L = d(r_0, r_m)                                   (eval.py)
- ndtw = exp(-DTW(P, R) / (3.0 * |R|)), DTW over geodesic distances d(p, r)         (r4r dtw.py)
- sdtw = ndtw if d(P[-1], R[-1]) <= 3.0 else 0                                      (r4r dtw.py)
- cls = PC * LS, PC = mean_{r in R} exp(-min_{p in P} d(r, p) / 3.0),
  LS = PC * PL(R) / (PC * PL(R) + |PC * PL(R) - PL(P)|), PL = sum of edge weights     (r4r cls.py)

where P and R are the trajectory and reference with consecutive repeated viewpoints (in-place
turns) collapsed. Aggregates are means over instructions (success rates as fractions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cliptransfer.fileio import read_json, write_json
from cliptransfer.nav.episodes import Episode, check_episodes, load_r2r, load_rxr
from cliptransfer.nav.graph import NavGraph, load_graphs, read_scans

__all__ = [
    "SUCCESS_DISTANCE",
    "NavResultsError",
    "cls_score",
    "collapse",
    "dtw",
    "evaluate_nav",
    "evaluate_nav_files",
    "ndtw",
    "score_trajectory",
    "sdtw",
]

SUCCESS_DISTANCE = 3.0  # eval.py `error_margin`; r4r's DTW/CLS `threshold` default
SUMMARY_KEYS = (
    "nav_error", "oracle_error", "success_rate", "oracle_success_rate", "spl", "length",
    "ndtw", "sdtw", "cls",
)  # fmt: skip
_ITEM_KEYS = {
    "nav_error": "nav_error", "oracle_error": "oracle_error", "success_rate": "success",
    "oracle_success_rate": "oracle_success", "spl": "spl", "length": "length", "ndtw": "ndtw",
    "sdtw": "sdtw", "cls": "cls",
}  # fmt: skip


class NavResultsError(ValueError):
    """A results list or file that cannot be scored; the message names the file and record."""


def collapse(path: Sequence[str]) -> list[str]:
    """`path` with consecutive repeats (in-place turns) merged: [a, a, b, a] -> [a, b, a]."""
    return [v for i, v in enumerate(path) if i == 0 or v != path[i - 1]]


def dtw(graph: NavGraph, prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Dynamic time warping cost with geodesic distances d(prediction_i, reference_j) (r4r)."""
    inf = math.inf
    prev = [0.0] + [inf] * len(reference)
    for p in prediction:
        cur = [inf] * (len(reference) + 1)
        for j, r in enumerate(reference, 1):
            cur[j] = graph.distance(p, r) + min(prev[j], cur[j - 1], prev[j - 1])
        prev = cur
    return prev[-1]


def ndtw(
    graph: NavGraph,
    prediction: Sequence[str],
    reference: Sequence[str],
    threshold: float = SUCCESS_DISTANCE,
) -> float:
    """exp(-DTW / (threshold * |reference|)) (r4r dtw.py, metric='ndtw'); paths used as given."""
    return math.exp(-dtw(graph, prediction, reference) / (threshold * len(reference)))


def sdtw(
    graph: NavGraph,
    prediction: Sequence[str],
    reference: Sequence[str],
    threshold: float = SUCCESS_DISTANCE,
) -> float:
    """nDTW when d(prediction[-1], reference[-1]) <= threshold, else 0 (r4r dtw.py)."""
    if graph.distance(prediction[-1], reference[-1]) <= threshold:
        return ndtw(graph, prediction, reference, threshold)
    return 0.0


def _edge_length(graph: NavGraph, nodes: Sequence[str]) -> float:
    """Sum of edge weights along consecutive `nodes` (r4r's `length`; they must be neighbours)."""
    total = 0.0
    for a, b in zip(nodes, nodes[1:]):
        weight = next((w for v, w in graph.adjacency[a] if v == b), None)
        if weight is None:
            raise ValueError(f"scan {graph.scan}: no edge between {a} and {b} for CLS lengths")
        total += weight
    return total


def cls_score(
    graph: NavGraph,
    prediction: Sequence[str],
    reference: Sequence[str],
    threshold: float = SUCCESS_DISTANCE,
) -> float:
    """Coverage weighted by length score (Jain et al. 2019), as r4r's cls.py.

    When both the expected length PC * PL(R) and PL(P) are 0 (one-viewpoint reference and
    prediction), r4r's LS is 0/0; here it is 1 (the lengths agree).
    """
    coverage = sum(
        math.exp(-min(graph.distance(u, v) for v in prediction) / threshold) for u in reference
    ) / len(reference)
    expected = coverage * _edge_length(graph, reference)
    denominator = expected + abs(expected - _edge_length(graph, prediction))
    return coverage * (expected / denominator if denominator > 0 else 1.0)


def score_trajectory(
    graph: NavGraph, reference: Sequence[str], trajectory: Sequence[str]
) -> dict[str, float]:
    """Every per-instruction metric of one trajectory (viewpoint ids, turns included)."""
    start, goal = reference[0], reference[-1]
    nav_error = graph.distance(trajectory[-1], goal)
    oracle_error = min(graph.distance(v, goal) for v in trajectory)
    length = sum(graph.distance(a, b) for a, b in zip(trajectory, trajectory[1:]))
    shortest = graph.distance(start, goal)
    success = nav_error < SUCCESS_DISTANCE
    if not success:
        spl = 0.0
    else:  # eval.py's sp / max(length, sp); 0/0 (start is the goal, no move) counts as 1
        spl = shortest / max(length, shortest) if max(length, shortest) > 0 else 1.0
    pred, ref = collapse(trajectory), collapse(reference)
    ndtw_ = ndtw(graph, pred, ref)
    sdtw_ = ndtw_ if graph.distance(pred[-1], ref[-1]) <= SUCCESS_DISTANCE else 0.0
    return {
        "nav_error": nav_error,
        "oracle_error": oracle_error,
        "success": float(success),
        "oracle_success": float(oracle_error < SUCCESS_DISTANCE),
        "spl": spl,
        "length": length,
        "shortest_path_length": shortest,
        "ndtw": ndtw_,
        "sdtw": sdtw_,
        "cls": cls_score(graph, pred, ref),
    }


def _trajectory(item: Any, where: str) -> list[str]:
    traj = item.get("trajectory")
    if not isinstance(traj, list) or not traj:
        raise NavResultsError(f"{where}: 'trajectory' must be a non-empty list")
    out = []
    for k, step in enumerate(traj):
        if not isinstance(step, list | tuple) or not step or not isinstance(step[0], str):
            raise NavResultsError(
                f"{where}: trajectory step {k} must be [viewpoint, heading, elevation], "
                f"got {step!r:.80}"
            )
        out.append(step[0])
    return out


def _check_trajectory(ep: Episode, graph: NavGraph, traj: list[str], where: str) -> None:
    for k, v in enumerate(traj):
        if v not in graph:
            raise NavResultsError(f"{where}: step {k}: viewpoint {v!r} is not in scan {ep.scan}")
    if traj[0] != ep.start:
        raise NavResultsError(
            f"{where}: trajectory starts at {traj[0]}, not at the episode's start {ep.start}"
        )
    for k, (a, b) in enumerate(zip(traj, traj[1:]), 1):
        if a != b and b not in graph.neighbors(a):
            raise NavResultsError(
                f"{where}: step {k}: jump from {a} to {b}, which are not neighbours in the "
                f"navigation graph of scan {ep.scan}"
            )


def evaluate_nav(
    episodes: Iterable[Episode],
    results: Sequence[Mapping[str, Any]],
    graphs: Mapping[str, NavGraph],
    *,
    source: str = "results",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(summary, per-item dicts in episode order) of `results` against `episodes`.

    `results` is `[{"instr_id", "trajectory": [[viewpoint, heading, elevation], ...]}]`, exactly
    one per episode. An unknown, duplicate or missing instr_id, a trajectory not starting at the
    episode's start, a viewpoint not in the scan, or a move between distinct viewpoints that are
    not graph neighbours raises NavResultsError naming `source`, the record and the instr_id.
    """
    episodes = list(episodes)
    check_episodes(episodes, graphs, require_instruction=False)
    by_id: dict[str, Episode] = {}
    for ep in episodes:
        if ep.instr_id in by_id:
            raise NavResultsError(f"episodes: duplicate instr_id {ep.instr_id!r} ({ep.source})")
        by_id[ep.instr_id] = ep
    if not isinstance(results, list):
        raise NavResultsError(f"{source}: expected a list of {{instr_id, trajectory}} records")
    scored: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(results):
        where = f"{source}: record {i}"
        if not isinstance(item, dict) or "instr_id" not in item:
            raise NavResultsError(f"{where}: expected an object with 'instr_id' and 'trajectory'")
        instr_id = item["instr_id"]
        if isinstance(instr_id, int) and not isinstance(instr_id, bool):
            instr_id = str(instr_id)
        if not isinstance(instr_id, str):
            raise NavResultsError(f"{where}: instr_id must be a string, got {instr_id!r:.80}")
        where = f"{where} (instr_id {instr_id})"
        if instr_id not in by_id:
            raise NavResultsError(f"{where}: unknown instr_id {instr_id!r}")
        if instr_id in scored:
            raise NavResultsError(f"{where}: duplicate instr_id {instr_id!r}")
        ep = by_id[instr_id]
        graph = graphs[ep.scan]
        traj = _trajectory(item, where)
        _check_trajectory(ep, graph, traj, where)
        scored[instr_id] = {"instr_id": instr_id, **score_trajectory(graph, ep.path, traj)}
    missing = [i for i in by_id if i not in scored]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise NavResultsError(
            f"{source}: no trajectory for {len(missing)} instr_id(s) of {len(by_id)}: {shown}"
        )
    items = [scored[ep.instr_id] for ep in episodes]
    n = len(items)
    summary = {
        key: (sum(it[_ITEM_KEYS[key]] for it in items) / n if n else math.nan)
        for key in SUMMARY_KEYS
    }
    return summary, items


def evaluate_nav_files(
    episodes_path: str | Path,
    connectivity_dir: str | Path,
    results_path: str | Path,
    kind: str = "r2r",
    per_item: str | Path | None = None,
    *,
    languages: Iterable[str] | None = None,
) -> dict[str, float]:
    """The summary of `evaluate_nav` on files; `per_item` (a path) also gets the per-item list.

    `kind` is "r2r" (R2R-format JSON) or "rxr" (RxR guide JSON Lines, `languages` filter).
    Only the scans of the episodes are loaded; an episode whose scan has no connectivity file is
    an error naming it.
    """
    if kind == "r2r":
        episodes = load_r2r(episodes_path)
    elif kind == "rxr":
        episodes = load_rxr(episodes_path, languages)
    else:
        raise ValueError(f"kind must be 'r2r' or 'rxr', not {kind!r}")
    available = set(read_scans(connectivity_dir))
    wanted = sorted({ep.scan for ep in episodes} & available)
    graphs = load_graphs(connectivity_dir, wanted)
    results = read_json(results_path, what="navigation results")
    summary, items = evaluate_nav(episodes, results, graphs, source=str(results_path))
    if per_item is not None:
        write_json(per_item, items)
    return summary
