"""`cliptransfer prepare houses`: the tiny houses in the real Matterport / R2R / RxR formats, read
back by the navigation loaders, scored by the official metrics, deterministic per seed."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cliptransfer.cli import main
from cliptransfer.fileio import iter_jsonl, read_json
from cliptransfer.nav import check_episodes, load_graphs, load_r2r, load_rxr, read_scans
from cliptransfer.worlds.houses import prepare_houses


@pytest.fixture(scope="module")
def houses(tmp_path_factory) -> Path:
    return prepare_houses(tmp_path_factory.mktemp("houses") / "h", "tiny", seed=0, workers=1)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_connectivity_is_what_mattersim_loads(houses):
    conn = houses / "r2r" / "connectivity"
    scans = read_scans(conn)
    assert (conn / "scans.txt").read_text().split() == scans and len(scans) == 3
    graphs = load_graphs(conn)
    for scan in scans:
        recs = read_json(conn / f"{scan}_connectivity.json")
        n = len(recs)
        free = np.array([r["unobstructed"] for r in recs])
        seen = np.array([r["visible"] for r in recs])
        assert free.shape == (n, n) and (free == free.T).all() and not free.diagonal().any()
        assert (seen | ~free).all()  # unobstructed implies visible
        for r in recs:
            assert len(r["pose"]) == 16 and r["pose"][12:] == [0, 0, 0, 1] and r["included"]
            rot = np.array(r["pose"]).reshape(4, 4)[:3, :3]
            assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-5)
            assert 1.4 < r["height"] < 1.6 and len(r["image_id"]) == 32
        g = graphs[scan]
        lengths = [w for v in g.viewpoints for _, w in g.adjacency[v]]
        degrees = [len(g.adjacency[v]) for v in g.viewpoints]
        assert 0.8 < min(lengths) and max(lengths) < 3.4  # Matterport: median edge ~2.1 m
        assert 2.5 < np.mean(degrees) < 6.0  # Matterport: mean degree 4.1
        first = g.viewpoints[0]
        assert len(g.distances_from(first)) == len(g.viewpoints)  # connected


def test_r2r_episodes(houses):
    graphs = load_graphs(houses / "r2r" / "connectivity")
    manifest = read_json(houses / "manifest.json")
    train_scans = set(manifest["splits"]["train"])
    pairs = {}
    for split in ("train", "val_seen", "val_unseen"):
        recs = read_json(houses / "r2r" / f"R2R_{split}.json")
        assert recs and all(len(r["instructions"]) == 3 for r in recs)
        for r in recs:
            g = graphs[r["scan"]]
            assert 4 <= len(r["path"]) <= 7
            assert r["path"] == g.shortest_path(r["path"][0], r["path"][-1])
            assert r["distance"] == pytest.approx(g.distance(r["path"][0], r["path"][-1]), abs=1e-6)
            assert 5 <= r["distance"] <= 20 and 0 <= r["heading"] < 2 * math.pi
            assert all(t and t[0].isupper() and t.endswith(".") for t in r["instructions"])
        scans = {r["scan"] for r in recs}
        assert (scans <= train_scans) if split != "val_unseen" else not (scans & train_scans)
        pairs[split] = {(r["path"][0], r["path"][-1]) for r in recs}
        episodes = load_r2r(houses / "r2r" / f"R2R_{split}.json")
        kept, skipped = check_episodes(episodes, graphs)  # raises on a bad record
        assert len(kept) == 3 * len(recs) and not any(skipped.values())
    assert not pairs["train"] & pairs["val_seen"]


def test_rxr_guides_in_four_languages(houses):
    for split in ("train", "val_seen", "val_unseen"):
        path = houses / "rxr" / f"rxr_{split}_guide.jsonl.gz"
        episodes = load_rxr(path)
        languages = {e.language for e in episodes}
        assert languages == {"en-US", "en-IN", "hi-IN", "te-IN"}
        for e in episodes:
            if e.language == "hi-IN":
                assert any("\u0900" <= ch <= "\u097f" for ch in e.instruction)
            if e.language == "te-IN":
                assert any("\u0c00" <= ch <= "\u0c7f" for ch in e.instruction)
        assert len(load_rxr(path, languages=["en"])) == len(episodes) // 2
        assert len({e.instr_id for e in episodes}) == len(episodes)


@pytest.mark.parametrize("task", ["r2r", "rxr"])
def test_shortest_path_agent_scores_one(houses, tmp_path, capsys, task):
    episodes = (houses / "r2r" / "R2R_val_unseen.json" if task == "r2r"
                else houses / "rxr" / "rxr_val_unseen_guide.jsonl.gz")  # fmt: skip
    loaded = load_r2r(episodes) if task == "r2r" else load_rxr(episodes)
    results = [{"instr_id": e.instr_id, "trajectory": [[v, 0.0, 0.0] for v in e.path]}
               for e in loaded]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(results))
    rc = main(["evaluate", task, "--episodes", str(episodes), "--connectivity",
               str(houses / "r2r" / "connectivity"), "--results", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["success_rate"] == metrics["spl"] == 1.0 and metrics["nav_error"] == 0.0
    assert metrics["ndtw"] == pytest.approx(1.0)


def test_captions_and_skyboxes(houses):
    from cliptransfer.contrastive.pairs import load_pairs, open_image

    rows = [r for _, r in iter_jsonl(houses / "captions" / "views_train.jsonl")]
    assert rows and all(r["caption"] for r in rows)
    pairs = load_pairs(houses / "captions" / "views_train.jsonl")  # the contrastive trainer's
    assert [p.caption for p in pairs] == [r["caption"] for r in rows]
    assert open_image(pairs[0].image).size == (128, 96)
    named = [r for r in rows if " with " in r["caption"] or ":" in r["caption"]]
    assert len(named) > len(rows) / 4  # most views show a landmark
    from PIL import Image

    manifest = read_json(houses / "manifest.json")
    n = manifest["preset"]["skybox"]
    skyboxes = list((houses / "scans").glob("*/matterport_skybox_images/*_skybox_small.jpg"))
    assert len(skyboxes) == manifest["counts"]["viewpoints"]
    with Image.open(skyboxes[0]) as im:
        assert im.size == (6 * n, n)


def test_same_seed_same_bytes(houses, tmp_path):
    again = prepare_houses(tmp_path / "again", "tiny", seed=0, workers=2)
    assert _digest(again) == _digest(houses)


def test_extract_views_env_and_show_episode_on_a_house(houses, tmp_path):
    """The real-data path end to end on one house: skyboxes -> CLIP view store -> NavEnv."""
    from cliptransfer.nav import NavEnv, NavTables, evaluate_nav, load_view_table

    conn = houses / "r2r" / "connectivity"
    scan = read_json(houses / "manifest.json")["splits"]["val_unseen"][0]
    rc = main(["extract", "views", "--connectivity", str(conn), "--skyboxes",
               str(houses / "scans"), "--scans", scan, "--camera", "64x48", "--out",
               str(tmp_path / "views"), "--cpu"])  # fmt: skip
    assert rc == 0
    graphs = load_graphs(conn, [scan])
    tables = NavTables.build(graphs)
    features = load_view_table(tmp_path / "views", tables)
    assert features.shape[:2] == (len(graphs[scan].viewpoints), 36) and features.std() > 0
    episodes = [e for e in load_r2r(houses / "r2r" / "R2R_val_unseen.json") if e.scan == scan]
    env = NavEnv(tables, features)
    ob = env.reset(episodes)
    while not env.done:
        ob = env.step(ob.teacher.clamp(min=0))
    metrics, _ = evaluate_nav(episodes, env.trajectories(), graphs)
    assert metrics["success_rate"] == metrics["spl"] == 1.0
    (tmp_path / "res.json").write_text(json.dumps(env.trajectories()))
    out = tmp_path / "ep.png"
    rc = main(["show-episode", "--episodes", str(houses / "r2r" / "R2R_val_unseen.json"),
               "--connectivity", str(conn), "--instr-id", episodes[0].instr_id, "--results",
               str(tmp_path / "res.json"), "--skyboxes", str(houses / "scans"), "--out", str(out)])  # fmt: skip
    assert rc == 0 and out.stat().st_size > 10_000


def test_supervised_view_encoder_is_the_detectors_pool5_of_the_whole_view(houses, tmp_path):
    """EnvDrop's ImageNet-pool5 analogue: the region model's pool5 of one box = the whole view."""
    import torch

    from cliptransfer.nav import NavTables, load_view_table
    from cliptransfer.nav.extract_views import RegionViewEncoder, extract_views, viewpoint_images
    from cliptransfer.nav.view_features import NUM_VIEWS
    from cliptransfer.worlds.shapes.region_model import (
        RegionModelConfig,
        RegionNet,
        save_region_model,
    )  # fmt: skip

    torch.manual_seed(0)
    cfg = RegionModelConfig(["circle", "star"], {"colour": ["red"], "size": ["small"]}, dim=32,
                            widths=(8, 8, 16), head_width=16)  # fmt: skip
    save_region_model(RegionNet(cfg).eval(), tmp_path / "model")
    encoder = RegionViewEncoder(tmp_path / "model")
    assert encoder.meta["channels"] == 32 and encoder.meta["feature"] == "region_pool5_whole_view"
    conn = houses / "r2r" / "connectivity"
    scan = read_json(houses / "manifest.json")["splits"]["val_unseen"][0]
    stats = extract_views(encoder, conn, tmp_path / "views", skyboxes=houses / "scans",
                          scans=[scan], width=64, height=48)  # fmt: skip
    graphs = load_graphs(conn, [scan])
    assert stats["written"] == len(graphs[scan].viewpoints)
    features = load_view_table(tmp_path / "views", NavTables.build(graphs))  # (N, 36, 32)
    vp = graphs[scan].viewpoints[0]
    imgs = viewpoint_images(scan, vp, graphs[scan].poses[vp].reshape(-1),
                            skyboxes=houses / "scans", views_dir=None, width=64, height=48,
                            vfov=math.radians(60))  # fmt: skip
    net = RegionNet(cfg)
    net.load_state_dict(encoder.module.state_dict())
    with torch.no_grad():
        for ix in (0, 13, 35):
            x = torch.from_numpy(imgs[ix]).permute(2, 0, 1)[None]  # (1, 3, 48, 64) uint8
            want = net.eval().pool5(net.feature_map(x), torch.tensor([[0.0, 0, 0, 64, 48]]))
            assert torch.allclose(features[0, ix], want[0], atol=1e-5)
    assert features.shape[1] == NUM_VIEWS and (features >= 0).all()  # post-ReLU, as pool5
    # The same weights from another folder (a moved cache) reuse the store: the folder in the
    # backbone's label is informational, the weights' digest is what must match.
    shutil.copytree(tmp_path / "model", tmp_path / "moved")
    again = extract_views(RegionViewEncoder(tmp_path / "moved"), conn, tmp_path / "views",
                          skyboxes=houses / "scans", scans=[scan], width=64, height=48)  # fmt: skip
    assert (again["written"], again["already"]) == (0, stats["written"])


def test_statistics_and_turn_words(houses):
    stats = read_json(houses / "manifest.json")["stats"]
    assert 2.5 < stats["graph"]["degree_mean"] < 6
    rows = stats["instructions"]
    assert set(rows) == {"r2r en-US", "rxr en-US", "rxr en-IN", "rxr hi-IN", "rxr te-IN"}
    for row in rows.values():
        assert row["landmarks_mean"] >= 1.0  # instructions lean on what is seen
        assert row["turn_words_reach_goal"] < 0.4  # turn words alone rarely suffice
        assert 4 <= row["path_vps_mean"] <= 7


def test_sentencepiece_trains_on_all_four_languages(houses, tmp_path):
    from cliptransfer.tokenization.spiece import train_sentencepiece

    episodes = [e for s in ("train", "val_seen", "val_unseen") for e in
                load_rxr(houses / "rxr" / f"rxr_{s}_guide.jsonl.gz")]  # fmt: skip
    corpus = tmp_path / "rxr.txt"
    corpus.write_text("".join(e.instruction + "\n" for e in episodes), encoding="utf-8")
    tok = train_sentencepiece(corpus, 200, tmp_path / "tok", character_coverage=1.0)
    unk = tok.sp.unk_id() + 1
    for e in load_rxr(houses / "rxr" / "rxr_val_unseen_guide.jsonl.gz"):
        ids = tok.tokenize_words(e.instruction)
        assert unk not in ids, (e.language, e.instruction)
        assert tok._decode_words(ids) == e.instruction
