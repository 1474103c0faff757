"""Navigation episodes and metrics: every metric worked out by hand on small synthetic graphs
(Matterport3DSimulator tasks/R2R/eval.py and google-research r4r definitions, including r4r's own
doctest values), the shortest-path agent on real R2R val_unseen, and the error cases."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from cliptransfer.fileio import JSONFileError
from cliptransfer.nav.episodes import Episode, EpisodeError, check_episodes, load_r2r, load_rxr
from cliptransfer.nav.graph import load_graphs
from cliptransfer.nav.metrics import (
    NavResultsError,
    cls_score,
    collapse,
    dtw,
    evaluate_nav,
    evaluate_nav_files,
    ndtw,
    score_trajectory,
    sdtw,
)

E = math.exp


def _pose(x: float, y: float) -> list[float]:
    return [1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, 1.5, 0, 0, 0, 1]


def _write_scan(root: Path, scan: str, points: dict[str, tuple[float, float]],
                edges: list[tuple[str, str]]) -> None:  # fmt: skip
    names = list(points)
    linked = {(a, b) for a, b in edges} | {(b, a) for a, b in edges}
    records = [
        {"image_id": a, "pose": _pose(*points[a]), "included": True, "height": 1.5,
         "visible": [(a, b) in linked for b in names],
         "unobstructed": [(a, b) in linked for b in names]}
        for a in names
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{scan}_connectivity.json").write_text(json.dumps(records))


@pytest.fixture()
def line_dir(tmp_path: Path) -> Path:
    """Scan "line": v0..v5 at x = 0..5 m joined in a chain, and a spur s at (1, 1) off v1.
    Scan "grid": r4r's doctest graph nx.grid_graph([3, 4]), nodes g{x}{y}, x < 4, y < 3."""
    root = tmp_path / "connectivity"
    pts = {f"v{i}": (float(i), 0.0) for i in range(6)} | {"s": (1.0, 1.0)}
    _write_scan(root, "line", pts, [(f"v{i}", f"v{i + 1}") for i in range(5)] + [("v1", "s")])
    grid = {f"g{x}{y}": (float(x), float(y)) for x in range(4) for y in range(3)}
    edges = [(f"g{x}{y}", f"g{x + 1}{y}") for x in range(3) for y in range(3)]
    edges += [(f"g{x}{y}", f"g{x}{y + 1}") for x in range(4) for y in range(2)]
    _write_scan(root, "grid", grid, edges)
    (root / "scans.txt").write_text("line\ngrid\n")
    return root


REF = ["v0", "v1", "v2", "v3", "v4"]  # L = 4 m, |R| = 5
TRAJS = {
    # a: turns in place at v0 and s, detours v1 -> s -> v1, reaches the goal.
    "1_0": ["v0", "v0", "v1", "s", "s", "v1", "v2", "v3", "v4"],
    # b: stops at v1, exactly 3.0 m from the goal.
    "1_1": ["v0", "v1"],
    # c: overshoots to v5.
    "1_2": ["v0", "v1", "v2", "v3", "v4", "v5"],
    # d: reaches the goal and walks back to the start.
    "1_3": ["v0", "v1", "v2", "v3", "v4", "v3", "v2", "v1", "v0"],
}
PC_B = (1 + 1 + E(-1 / 3) + E(-2 / 3) + E(-1)) / 5  # coverage of v0..v4 by {v0, v1}
CLS_B = PC_B * (4 * PC_B / (4 * PC_B + abs(4 * PC_B - 1)))
BY_HAND = {
    #        nav  oracle succ osucc spl   length  ndtw          sdtw          cls
    "1_0": (0.0, 0.0, 1.0, 1.0, 4 / 6, 6.0, E(-1 / 15), E(-1 / 15), 4 / (4 + 2)),
    "1_1": (3.0, 3.0, 0.0, 0.0, 0.0, 1.0, E(-6 / 15), E(-6 / 15), CLS_B),
    "1_2": (1.0, 0.0, 1.0, 1.0, 4 / 5, 5.0, E(-1 / 15), E(-1 / 15), 4 / (4 + 1)),
    "1_3": (4.0, 0.0, 0.0, 1.0, 0.0, 8.0, E(-8 / 15), 0.0, 4 / (4 + 4)),
}
ITEM_KEYS = ("nav_error", "oracle_error", "success", "oracle_success", "spl", "length", "ndtw",
             "sdtw", "cls")  # fmt: skip


def _episodes() -> list[Episode]:
    return [Episode(i, "line", 1, list(REF), 0.0, "walk") for i in TRAJS]


def _results(trajs: dict[str, list[str]]) -> list[dict]:
    return [{"instr_id": i, "trajectory": [[v, 0.0, 0.0] for v in t]} for i, t in trajs.items()]


def test_every_metric_by_hand_on_a_line(line_dir):
    g = load_graphs(line_dir, ["line"])["line"]
    # DTW tables (cost = |x_p - x_r|), minimum over monotone alignments:
    # a: P = v0 v1 s v1 v2 v3 v4 after collapsing; only s costs, d(s, v1) = 1 -> DTW 1. Without
    #    collapsing, the second s costs 1 again -> 2: in-place turns must not count.
    assert collapse(TRAJS["1_0"]) == ["v0", "v1", "s", "v1", "v2", "v3", "v4"]
    assert dtw(g, collapse(TRAJS["1_0"]), REF) == 1.0 and dtw(g, TRAJS["1_0"], REF) == 2.0
    # b: row v0 = 0 1 3 6 10; row v1 = 1 0 1 3 6 -> 6.
    assert dtw(g, TRAJS["1_1"], REF) == 6.0
    # c: v5 aligned with v4 -> 1.   d: v0..v3 free, v4 v3 v2 v1 against v3 (1+0+1+2), v0 vs v4 (4).
    assert dtw(g, TRAJS["1_2"], REF) == 1.0 and dtw(g, TRAJS["1_3"], REF) == 8.0
    for instr_id, traj in TRAJS.items():
        got = score_trajectory(g, REF, traj)
        for key, want in zip(ITEM_KEYS, BY_HAND[instr_id]):
            assert got[key] == pytest.approx(want, abs=1e-12), (instr_id, key)
        assert got["shortest_path_length"] == 4.0
    # b: 3.0 m is not a success (eval.py: error < 3.0) but is for SDTW (r4r: <= threshold).
    # PC = (2 + .716531 + .513417 + .367879) / 5 = .719565; LS = 2.878261 / 4.756522 = .605118.
    assert CLS_B == pytest.approx(0.435422, abs=1e-6)

    summary, items = evaluate_nav(_episodes(), _results(TRAJS), {"line": g})
    assert [it["instr_id"] for it in items] == list(TRAJS)
    means = [sum(col) / 4 for col in zip(*BY_HAND.values())]
    names = ("nav_error", "oracle_error", "success_rate", "oracle_success_rate", "spl", "length",
             "ndtw", "sdtw", "cls")  # fmt: skip
    assert summary == pytest.approx(dict(zip(names, means)), abs=1e-12)
    assert summary["nav_error"] == 2.0 and summary["success_rate"] == 0.5
    assert summary["oracle_success_rate"] == 0.75 and summary["length"] == 5.0


def test_spl_uses_shortest_start_goal_distance_not_the_reference_length(line_dir):
    g = load_graphs(line_dir, ["line"])["line"]
    ref = ["v0", "v1", "s", "v1", "v2"]  # the reference detours: 4 m long, L = d(v0, v2) = 2
    got = score_trajectory(g, ref, ["v0", "v1", "v2"])
    assert got["spl"] == 1.0 and got["shortest_path_length"] == 2.0
    got = score_trajectory(g, ref, ["v0", "v1", "v2", "v3", "v2"])  # TL 4 > L 2
    assert got["spl"] == 0.5 and got["nav_error"] == 0.0


def test_r4r_doctest_values_on_the_grid(line_dir):
    # r4r/dtw.py and r4r/cls.py doctests on nx.grid_graph([3, 4]) (unit edges).
    g = load_graphs(line_dir, ["grid"])["grid"]
    pred, ref = ["g00", "g10", "g20", "g30"], ["g00", "g10", "g21", "g32"]
    assert dtw(g, pred, ref) == 3.0
    # The reference moves diagonally (not along edges): DTW needs distances only.
    assert ndtw(g, pred, ref) == pytest.approx(0.77880078307140488) == E(-3 / 12)
    assert sdtw(g, pred, ref) == pytest.approx(0.77880078307140488)  # d(g30, g32) = 2 <= 3
    assert sdtw(g, pred[:2], ref) == 0.0  # d(g10, g32) = 4 > 3
    cls_ref = ["g00", "g10", "g11", "g21", "g22", "g32"]
    assert cls_score(g, cls_ref, cls_ref) == pytest.approx(1.0)
    other = ["g00", "g01", "g11", "g21", "g31", "g32"]
    # PC = (4 + 2 e^-1/3) / 6, both lengths 5 -> LS = PC.
    pc = (4 + 2 * E(-1 / 3)) / 6
    assert cls_score(g, other, cls_ref) == pytest.approx(0.81994915125863865) == pc * pc
    # The doctest's cls(reference, prediction): first argument the prediction (6 nodes, 5 m),
    # second the reference g01 g11 g21 g31 (3 m): PC = (2 + 2 e^-1/3) / 4.
    short = ["g01", "g11", "g21", "g31"]
    pc = (2 + 2 * E(-1 / 3)) / 4
    want = pc * (3 * pc / (3 * pc + abs(3 * pc - 5)))
    assert cls_score(g, cls_ref, short) == pytest.approx(0.44197196102702557) == pytest.approx(want)


def _eval_error(line_dir, trajs, match):
    g = load_graphs(line_dir, ["line"])["line"]
    with pytest.raises(NavResultsError, match=match):
        evaluate_nav(_episodes(), _results(trajs), {"line": g}, source="res.json")


def test_results_errors_name_the_record(line_dir):
    ok = dict(TRAJS)
    _eval_error(line_dir, ok | {"9_9": ["v0"]}, r"res.json: record 4 \(instr_id 9_9\): unknown")
    dup = _results(ok) + _results({"1_2": ["v0"]})
    g = load_graphs(line_dir, ["line"])["line"]
    with pytest.raises(NavResultsError, match=r"record 4 \(instr_id 1_2\): duplicate instr_id"):
        evaluate_nav(_episodes(), dup, {"line": g})
    missing = {k: v for k, v in ok.items() if k != "1_1"}
    _eval_error(line_dir, missing, r"res.json: no trajectory for 1 instr_id\(s\) of 4: 1_1")
    _eval_error(line_dir, ok | {"1_2": ["v0", "v1", "zz"]},
                r"record 2 \(instr_id 1_2\): step 2: viewpoint 'zz' is not in scan line")  # fmt: skip
    _eval_error(line_dir, ok | {"1_3": ["v0", "v1", "v3"]},
                r"record 3 \(instr_id 1_3\): step 2: jump from v1 to v3")  # fmt: skip
    _eval_error(line_dir, ok | {"1_0": ["v1", "v2"]}, r"instr_id 1_0\): trajectory starts at v1")
    _eval_error(line_dir, ok | {"1_0": []}, r"instr_id 1_0\): 'trajectory' must be a non-empty")


def test_evaluate_nav_files_and_per_item(line_dir, tmp_path):
    eps = [{"scan": "line", "path_id": 1, "path": REF, "heading": 0.0, "distance": 4.0,
            "instructions": ["a", "b", "c", "d"]}]  # fmt: skip
    (tmp_path / "eps.json").write_text(json.dumps(eps))
    (tmp_path / "res.json").write_text(json.dumps(_results(TRAJS)))
    summary = evaluate_nav_files(tmp_path / "eps.json", line_dir, tmp_path / "res.json",
                                 per_item=tmp_path / "items.json")  # fmt: skip
    assert summary["success_rate"] == 0.5
    items = json.loads((tmp_path / "items.json").read_text())
    assert [it["instr_id"] for it in items] == list(TRAJS) and items[1]["nav_error"] == 3.0
    (tmp_path / "res.json").write_text(json.dumps(_results(TRAJS)[:3]))
    with pytest.raises(NavResultsError, match=r"res.json: no trajectory for 1 .*: 1_3"):
        evaluate_nav_files(tmp_path / "eps.json", line_dir, tmp_path / "res.json")


def test_shortest_agent_on_real_val_unseen(shared_data, tmp_path):
    r2r = shared_data / "r2r"
    summary = evaluate_nav_files(r2r / "R2R_val_unseen.json", r2r / "connectivity",
                                 r2r / "val_unseen_shortest_agent.json",
                                 per_item=tmp_path / "items.json")  # fmt: skip
    assert summary["success_rate"] == 1.0 and summary["oracle_success_rate"] == 1.0
    assert summary["spl"] == pytest.approx(1.0, abs=1e-9)
    assert summary["nav_error"] == pytest.approx(0.0, abs=1e-9)
    assert summary["oracle_error"] == pytest.approx(0.0, abs=1e-9)
    assert 0.99 < summary["ndtw"] <= 1.0 and summary["sdtw"] == summary["ndtw"]
    assert len(json.loads((tmp_path / "items.json").read_text())) == 2349


def test_load_r2r_real_counts_and_check(shared_data):
    r2r = shared_data / "r2r"
    eps = load_r2r(r2r / "R2R_val_unseen.json")
    assert len({e.path_id for e in eps}) == 783 and len(eps) == 2349  # 3 instructions a path
    assert eps[0].instr_id == f"{eps[0].path_id}_0" and eps[2].instr_id == f"{eps[0].path_id}_2"
    graphs = load_graphs(r2r / "connectivity", sorted({e.scan for e in eps}))
    kept, skipped = check_episodes(eps, graphs)
    assert len(kept) == 2349 and sum(skipped.values()) == 0


def test_load_r2r_files_and_augmented_paths(tmp_path):
    recs = [
        {"scan": "line", "path_id": 7, "path": ["v0", "v1"], "heading": 1.5, "distance": 1.0,
         "instructions": ["go", "walk"]},
        {"scan": "line", "path_id": 8, "path": ["v2"], "heading": 0},  # EnvDrop aug: no text
    ]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(recs))
    with gzip.open(tmp_path / "r.json.gz", "wt") as f:
        json.dump(recs, f)
    for name in ("r.json", "r.json.gz"):
        eps = load_r2r(tmp_path / name)
        assert [e.instr_id for e in eps] == ["7_0", "7_1", "8_0"]
        assert eps[1] == Episode("7_1", "line", 7, ["v0", "v1"], 1.5, "walk", None, 1.0)
        assert eps[2].instruction == "" and eps[2].distance is None
    (tmp_path / "bad.json").write_text(json.dumps([recs[0], {"path_id": 3, "path": []}]))
    with pytest.raises(EpisodeError, match=r"bad.json: record 1: missing 'scan'"):
        load_r2r(tmp_path / "bad.json")
    (tmp_path / "bad.json.gz").write_bytes(b"[]")
    with pytest.raises(JSONFileError, match=r"bad.json.gz: not a valid gzip file"):
        load_r2r(tmp_path / "bad.json.gz")
    (tmp_path / "bad.json").write_bytes(b'[{"scan": "\xff"}]')
    with pytest.raises(JSONFileError, match=r"bad.json: line 1: invalid UTF-8 byte"):
        load_r2r(tmp_path / "bad.json")


def test_load_rxr_jsonl_gz_and_language_filter(tmp_path):
    def rec(i, lang):
        return {"instruction_id": i, "path_id": 10 + i, "scan": "line", "path": ["v0", "v1"],
                "heading": 0.5, "instruction": f"text {i}", "language": lang}  # fmt: skip

    lines = [rec(1, "en-IN"), rec(2, "hi-IN"), rec(3, "en-US"), rec(4, "te-IN")]
    text = "\n".join(json.dumps(r) for r in lines) + "\n\n"
    (tmp_path / "rxr.jsonl").write_text(text)
    with gzip.open(tmp_path / "rxr.jsonl.gz", "wt") as f:
        f.write(text)
    for name in ("rxr.jsonl", "rxr.jsonl.gz"):
        eps = load_rxr(tmp_path / name)
        assert [e.instr_id for e in eps] == ["1", "2", "3", "4"]
        assert eps[1] == Episode("2", "line", 12, ["v0", "v1"], 0.5, "text 2", "hi-IN")
        assert [e.instr_id for e in load_rxr(tmp_path / name, ["en"])] == ["1", "3"]
        assert [e.instr_id for e in load_rxr(tmp_path / name, ["en-US", "te-IN"])] == ["3", "4"]
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(lines[0]).encode() + b"\n{oops\n")
    with pytest.raises(JSONFileError, match=r"bad.jsonl: line 2: invalid JSON"):
        load_rxr(tmp_path / "bad.jsonl")
    bad = dict(lines[0], path="v0")
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(EpisodeError, match=r"bad.jsonl: line 2 \(instruction_id 1\): 'path'"):
        load_rxr(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(JSONFileError, match=r"bad.jsonl.gz: line 1: not a valid gzip file"):
        load_rxr(tmp_path / "bad.jsonl.gz")
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "rxr.jsonl.gz").read_bytes()[:-12])
    with pytest.raises(JSONFileError, match=r"cut.jsonl.gz: line \d+: not a valid gzip file"):
        load_rxr(tmp_path / "cut.jsonl.gz")


def test_check_episodes_errors_and_skips(line_dir):
    graphs = load_graphs(line_dir)
    good = Episode("1_0", "line", 1, ["v0", "v1", "s"], 0.0, "go", source="f.json: record 0")
    bad = [
        Episode("2_0", "nope", 2, ["v0"], 0.0, "go", source="f.json: record 1"),
        Episode("3_0", "line", 3, ["v0", "zz"], 0.0, "go", source="f.json: record 2"),
        Episode("4_0", "line", 4, ["v0", "v2"], 0.0, "go", source="f.json: record 3"),
        Episode("5_0", "line", 5, ["v0", "v1"], 0.0, "  ", source="f.json: record 4"),
    ]
    messages = [
        r"f.json: record 1: unknown scan 'nope'",
        r"f.json: record 2: viewpoint 'zz' is not in scan line",
        r"f.json: record 3: path is not connected: v0 and v2 are not neighbours",
        r"f.json: record 4: empty instruction",
    ]
    for ep, message in zip(bad, messages):
        with pytest.raises(EpisodeError, match=message):
            check_episodes([good, ep], graphs)
    kept, skipped = check_episodes([good, *bad, bad[0]], graphs, skip_missing=True)
    assert kept == [good]
    assert skipped == {"unknown_scan": 2, "unknown_viewpoint": 1, "disconnected": 1,
                       "empty_instruction": 1}  # fmt: skip
    kept, _ = check_episodes([good, bad[3]], graphs, require_instruction=False)
    assert len(kept) == 2


def test_cli_evaluate_r2r_on_the_real_shortest_agent(shared_data, capsys, tmp_path):
    from cliptransfer.cli import main

    r2r = shared_data / "r2r"
    argv = ["evaluate", "r2r", "--episodes", str(r2r / "R2R_val_unseen.json"),
            "--connectivity", str(r2r / "connectivity"),
            "--results", str(r2r / "val_unseen_shortest_agent.json"),
            "--per-item", str(tmp_path / "items.json")]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["success_rate"], out["spl"], out["nav_error"]) == (1.0, 1.0, 0.0)
    assert len(json.loads((tmp_path / "items.json").read_text())) == 2349
