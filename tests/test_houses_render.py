"""The houses' renderer through MatterSim's view path (worlds/houses/raycast.py + nav.render_view):
landmarks show up where the geometry says, upright, heading to the right, elevation up."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cliptransfer.nav.render import render_view
from cliptransfer.worlds.houses.layout import (
    ROOM_TYPES,
    landmark_visible,
    sample_house,
    wrap_angle,
)
from cliptransfer.worlds.houses.raycast import CEILING, cube_directions, pose_matrix, render_skybox
from cliptransfer.worlds.shapes.scene import COLORS

W, H, VFOV = 160, 120, math.radians(60)


@pytest.fixture(scope="module")
def house():
    return sample_house(random.Random(3), 2, 2)


def _pixel_of(vp, m, heading):
    """Expected (row, col) of the landmark's centre in a horizon view at `heading`: x_c =
    tan(rel heading), up = tan(elevation) / cos(rel heading), row 0 = top (see raycast.py)."""
    rel = wrap_angle(math.atan2(m.x - vp.x, m.y - vp.y) - heading)
    dist = math.hypot(m.x - vp.x, m.y - vp.y)
    up = (m.z - vp.z) / dist / math.cos(rel)
    t = math.tan(VFOV / 2)
    col = (math.tan(rel) / (t * W / H) + 1) / 2 * W - 0.5
    row = (-up / t + 1) / 2 * H - 0.5
    return row, col


def test_cube_directions_invert_the_gl_face_table():
    from cliptransfer.nav.render import sample_cubemap

    n = 8
    dirs = cube_directions(n)
    faces = [np.full((n, n, 3), 0, np.uint8) for _ in range(6)]
    for k in range(6):  # encode (face, row, col) in the texel colour
        faces[k][..., 0] = k * 40
        faces[k][..., 1] = np.arange(n)[:, None] * 30
        faces[k][..., 2] = np.arange(n)[None, :] * 30
    got = sample_cubemap(faces, dirs.reshape(-1, 3)).reshape(6, n, n, 3)
    for k in range(6):
        assert (got[k, ..., 0] == k * 40).all()
        assert (got[k, ..., 1] == np.arange(n)[:, None] * 30).all()
        assert (got[k, ..., 2] == np.arange(n)[None, :] * 30).all()


def test_pose_is_matterport_like():
    pose = pose_matrix(1.0, 2.0, 1.5, 0.3)
    rot = pose[:3, :3]
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.isclose(np.linalg.det(rot), 1.0)
    assert np.allclose(rot[:, 1], [0, 0, -1])  # the camera's y axis points down, as Matterport's
    assert pose[:3, 3].tolist() == [1.0, 2.0, 1.5]


def test_skybox_face_zero_is_the_ceiling_and_five_the_floor(house):
    strip = render_skybox(house, 0, 32, supersample=1)
    faces = strip.reshape(32, 6, 32, 3).transpose(1, 0, 2, 3)
    assert (faces[0][12:20, 12:20] == CEILING).all()
    floors = {ROOM_TYPES[r.kind]["floor"] for r in house.rooms}
    centre = faces[5][16, 16].astype(float)
    assert min(np.abs(centre - np.array(f) * s).max() for f in floors for s in (0.92, 1.0)) < 2


def test_landmarks_appear_where_the_geometry_puts_them(house):
    checked = 0
    for i, vp in enumerate(house.viewpoints):
        for m in house.landmarks:
            dist = math.hypot(m.x - vp.x, m.y - vp.y)
            if m.striped or not 1.5 < dist < 5 or not landmark_visible(house, vp.x, vp.y, m):
                continue
            bearing = math.atan2(m.x - vp.x, m.y - vp.y)
            # The discretised view (30 deg columns) the landmark is closest to, as an agent sees it.
            col_ix = round(bearing / math.radians(30)) % 12
            heading = col_ix * math.radians(30)
            row, col = _pixel_of(vp, m, heading)
            if not (10 < col < W - 10 and 10 < row < H - 10):
                continue
            pose = pose_matrix(vp.x, vp.y, vp.z, vp.yaw).reshape(-1)
            strip = render_skybox(house, i, 128, supersample=1)
            img = render_view(strip, pose, heading, 0.0, width=W, height=H, vfov=VFOV)
            want = np.array(COLORS[m.color], float)
            assert np.abs(img[round(row), round(col)] - want).max() <= 3, (m, vp.id)
            match = np.abs(img.astype(float) - want).max(-1) <= 3
            rows, cols = np.nonzero(match)
            # Its own pixels centre on the expected spot (other landmarks share no colour).
            assert abs(cols.mean() - col) < 2.5 and abs(rows.mean() - row) < 4.0
            # Mirrored (heading to the left) or upside down would put it elsewhere.
            assert not match[round(row), W - 1 - round(col)] or abs(col - W / 2) < 3
            checked += 1
            break
        if checked >= 3:
            break
    assert checked >= 3


def test_elevation_looks_up(house):
    vp = house.viewpoints[0]
    pose = pose_matrix(vp.x, vp.y, vp.z, vp.yaw).reshape(-1)
    strip = render_skybox(house, 0, 64, supersample=1)
    ceiling = np.array(CEILING)
    share = {}
    for e in (-math.pi / 6, 0.0, math.pi / 6):
        img = render_view(strip, pose, 0.0, e, width=W, height=H, vfov=VFOV)
        share[e] = (np.abs(img.astype(int) - ceiling).max(-1) <= 2).mean()
        top, bottom = img[: H // 8], img[-H // 8 :]
        top_c = (np.abs(top.astype(int) - ceiling).max(-1) <= 2).mean()
        bottom_c = (np.abs(bottom.astype(int) - ceiling).max(-1) <= 2).mean()
        assert top_c >= bottom_c  # upright: the ceiling is at the top
    assert share[-math.pi / 6] < share[0.0] < share[math.pi / 6]
