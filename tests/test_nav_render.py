"""render_view follows MatterSim's rendering rules; expected views worked out from those rules on
asymmetric synthetic skyboxes (which face, which corner, which row order)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cliptransfer.nav.render import load_skybox, render_view, sample_cubemap

IDENTITY = np.eye(4).reshape(-1).tolist()
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _strip(n: int = 8) -> np.ndarray:
    return np.concatenate([np.full((n, n, 3), c, np.uint8) for c in COLOURS], axis=1)


@pytest.mark.parametrize(
    "heading, elevation, face",
    [
        # identity pose: l = Rz(-(pi + h)) Rx(pi/2 - e) (0, 0, -1); heading 0 -> -Y = strip face 5
        (0.0, 0.0, 5),
        (math.pi / 2, 0.0, 4),  # -X
        (math.pi, 0.0, 0),  # +Y
        (3 * math.pi / 2, 0.0, 2),  # +X
        (0.0, math.pi / 2, 3),  # -Z
        (0.0, -math.pi / 2, 1),  # +Z
    ],
)
def test_view_centre_comes_from_the_face_the_rules_select(heading, elevation, face):
    view = render_view(_strip(), IDENTITY, heading, elevation, width=32, height=24)
    assert view.shape == (24, 32, 3) and view.dtype == np.uint8
    assert tuple(view[12, 16]) == COLOURS[face]


def test_row_and_column_order_match_mattersim():
    # Face 5 (-Y, seen at heading 0): image top half red, bottom half blue; left half of each row
    # darker. With l = (-x_c, -1, y_c): t = (1 - y_c)/2, s = (1 - x_c)/2, so output row 0
    # (y_c < 0: glReadPixels' bottom row) shows the face's BOTTOM rows, and output column 0
    # (x_c < 0) the face's RIGHT half.
    n = 8
    face = np.zeros((n, n, 3), np.uint8)
    face[: n // 2] = (200, 0, 0)
    face[n // 2 :] = (0, 0, 200)
    face[:, : n // 2] //= 2
    strip = _strip(n)
    strip[:, 5 * n : 6 * n] = face
    view = render_view(strip, IDENTITY, 0.0, 0.0, width=40, height=30, vfov=math.radians(40))
    assert tuple(view[0, 0]) == (0, 0, 200)  # bottom-left of state.rgb: face bottom-right
    assert tuple(view[29, 0]) == (200, 0, 0)  # last row: face top-right
    assert tuple(view[0, 39]) == (0, 0, 100)  # right column: face left half (darker)


def test_bilinear_texel_centres_and_clamp_to_edge():
    n = 2
    face = np.array([[0, 100], [200, 60]], np.uint8)[..., None].repeat(3, axis=2)
    faces = [np.zeros((n, n, 3), np.uint8)] * 6
    faces = [face if k == 5 else f for k, f in enumerate(faces)]
    # The face centre lies between the 4 texel centres: their mean.
    assert sample_cubemap(faces, np.array([[0.0, -1.0, 0.0]]))[0, 0] == 90
    # A corner direction (s, t -> 0 on -Y: sc = x, tc = -z) clamps to texel (0, 0) exactly.
    assert sample_cubemap(faces, np.array([[-0.999, -1.0, 0.999]]))[0, 0] == 0


def test_strip_and_six_face_files_agree(tmp_path):
    strip = _strip(4)
    paths = []
    for k in range(6):
        paths.append(tmp_path / f"vp_skybox{k}_sami.jpg")
        Image.fromarray(strip[:, 4 * k : 4 * k + 4]).save(paths[-1], quality=100)
    faces = load_skybox(paths)
    assert all(np.abs(f.astype(int) - c).max() <= 2 for f, c in zip(faces, COLOURS))
    with pytest.raises(ValueError, match=r"a skybox strip is \(N, 6N, 3\), got \(4, 20, 3\)"):
        load_skybox(strip[:, :20])


def test_real_pose_looks_up_at_face_0(shared_data):
    import json

    records = json.loads(
        (shared_data / "r2r" / "connectivity" / "17DRP5sb8fy_connectivity.json").read_text()
    )
    # Matterport's skybox0 is the ceiling: looking straight up must land on it, down on skybox5.
    up = render_view(_strip(), records[0]["pose"], 0.3, math.pi / 2, width=8, height=6)
    down = render_view(_strip(), records[0]["pose"], 0.3, -math.pi / 2, width=8, height=6)
    assert tuple(up[3, 4]) == COLOURS[0] and tuple(down[3, 4]) == COLOURS[5]


def test_show_episode_on_real_data_with_a_synthetic_skybox(shared_data, tmp_path):
    from cliptransfer.cli import main

    r2r = shared_data / "r2r"
    episodes = json.loads((r2r / "R2R_val_unseen.json").read_text())
    ep = episodes[0]
    sky = tmp_path / "sky" / ep["scan"] / "matterport_skybox_images"
    sky.mkdir(parents=True)
    Image.fromarray(_strip(16)).save(sky / f"{ep['path'][0]}_skybox_small.jpg")
    out = tmp_path / "ep.png"
    argv = ["show-episode", "--episodes", str(r2r / "R2R_val_unseen.json"),
            "--connectivity", str(r2r / "connectivity"), "--instr-id", f"{ep['path_id']}_0",
            "--results", str(r2r / "val_unseen_shortest_agent.json"),
            "--skyboxes", str(tmp_path / "sky"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 700  # map + panorama
    assert main([*argv[:5], "--instr-id", "nope_0", "--out", str(out)]) == 2  # named error


def test_extract_views_from_skyboxes_and_from_pngs_agree(shared_data, tmp_path):
    from cliptransfer.cli import main
    from cliptransfer.nav import load_graphs
    from cliptransfer.nav.extract_views import clip_preprocess
    from cliptransfer.visual.extract import load_backbone
    from cliptransfer.visual.store import FeatureStore

    conn = tmp_path / "connectivity"  # one small real scan, three viewpoints included
    conn.mkdir()
    records = json.loads(
        (shared_data / "r2r" / "connectivity" / "17DRP5sb8fy_connectivity.json").read_text()
    )
    for i, r in enumerate(records):
        r["included"] = r["included"] and i < 3
    (conn / "17DRP5sb8fy_connectivity.json").write_text(json.dumps(records))
    (conn / "scans.txt").write_text("17DRP5sb8fy\n")
    graph = load_graphs(conn)["17DRP5sb8fy"]
    vps = [v for v in graph.viewpoints if graph.included[v]]
    sky = tmp_path / "sky" / "17DRP5sb8fy" / "matterport_skybox_images"
    sky.mkdir(parents=True)
    strip = _strip(16)
    for vp in vps:
        Image.fromarray(strip).save(sky / f"{vp}_skybox_small.jpg", quality=100)
    args = ["extract", "views", "--backbone", "RN-tiny", "--connectivity", str(conn), "--cpu"]
    assert main([*args, "--skyboxes", str(tmp_path / "sky"), "--out", str(tmp_path / "a")]) == 0
    store = FeatureStore.open(tmp_path / "a")
    assert sorted(store) == sorted(f"17DRP5sb8fy_{v}" for v in vps)
    feats = store[f"17DRP5sb8fy_{vps[0]}"]["features"]
    assert feats.shape == (36, store.metadata["channels"])
    # The same views written as PNGs give the same features (render -> PNG is lossless).
    pngs = tmp_path / "pngs" / "17DRP5sb8fy"
    pngs.mkdir(parents=True)
    faces = load_skybox(sky / f"{vps[0]}_skybox_small.jpg")
    for ix in range(36):
        h, e = divmod(ix, 12)[1] * math.radians(30), (ix // 12 - 1) * math.radians(30)
        img = render_view(faces, graph.poses[vps[0]].reshape(-1), h, e)
        Image.fromarray(img).save(pngs / f"{vps[0]}_{ix}.png")
    for vp in vps[1:]:
        for ix in range(36):
            Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(pngs / f"{vp}_{ix}.png")
    assert main([*args, "--views", str(tmp_path / "pngs"), "--out", str(tmp_path / "b")]) == 0
    other = FeatureStore.open(tmp_path / "b")[f"17DRP5sb8fy_{vps[0]}"]["features"]
    torch.testing.assert_close(other, feats, rtol=1e-4, atol=1e-5)
    # Feature 0 is CLIP's image embedding of view 0, preprocessed as OpenAI CLIP.
    clip = load_backbone("RN-tiny")[0].eval()
    view0 = render_view(faces, graph.poses[vps[0]].reshape(-1), 0.0, -math.radians(30))
    with torch.no_grad():
        expect = clip.encode_image(clip_preprocess(view0, clip.image_size)[None])[0]
    torch.testing.assert_close(feats[0], expect, rtol=1e-4, atol=1e-5)
    # Resumable: a second run writes nothing.
    assert main([*args, "--skyboxes", str(tmp_path / "sky"), "--out", str(tmp_path / "a")]) == 0
    # Rendering in a worker process: the same pixels, so the same features bit for bit.
    sky_args = ["--skyboxes", str(tmp_path / "sky"), "--out", str(tmp_path / "c")]
    assert main([*args, *sky_args, "--workers", "1"]) == 0
    pooled = FeatureStore.open(tmp_path / "c")
    for vp in vps:
        key = f"17DRP5sb8fy_{vp}"
        assert torch.equal(pooled[key]["features"], store[key]["features"])
