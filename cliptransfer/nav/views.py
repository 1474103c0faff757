"""MatterSim's discretised views and navigable locations, and R2R-EnvDrop's candidates, without
the C++ simulator.

`navigable` mirrors `Simulator::populateNavigable` (Matterport3DSimulator src/lib/MatterSim.cpp):
positions are the pose translations read as float32 (`f.asFloat()` in NavGraph.cpp), the offset
`target_dir`, its length, its normalisation and the dot/cross products with the camera's horizon
direction are float32 (glm::vec3) operations; the angles are double `atan2` of those floats.
A neighbour is visible iff `cos_angle >= cos(vfov * width / height / 2.0)`, the float32 cosine
of the horizontal angle between the camera heading and the neighbour (elevation plays no part);
the list is sorted by `sqrt(rel_heading^2 + rel_elevation^2)` with std::sort, which for the
at most 16 elements a Matterport viewpoint has (degree <= 13) is libstdc++'s insertion sort,
i.e. stable: ties keep graph (file) order.

`start_view` mirrors `Simulator::setHeadingElevation` with discretised views and elevation 0
(what `newEpisode(scan, vp, heading, 0)` does); `candidates` mirrors R2R-EnvDrop's
`R2RBatch.make_candidate` (r2r_src/env.py), whose 36-view sweep the simulator reaches with
headings `step * (2*pi/12)` and elevations `-pi/6, 0.0, pi/6`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from cliptransfer.nav.graph import NavGraph

__all__ = [
    "R2R_CAMERA",
    "Camera",
    "Candidate",
    "HEADING_COUNT",
    "HEADING_INCREMENT",
    "ELEVATION_INCREMENT",
    "NavigableLocation",
    "candidate_table",
    "candidates",
    "navigable",
    "start_view",
    "view_angles",
]

HEADING_COUNT = 12
HEADING_INCREMENT = math.pi * 2.0 / HEADING_COUNT  # MatterSim: M_PI*2.0/headingCount
ELEVATION_INCREMENT = math.pi / 6.0  # MatterSim: const double elevationIncrement = M_PI/6.0
_TWO_PI = math.pi * 2.0
_F32 = np.float32


class Camera(NamedTuple):
    width: int
    height: int
    vfov: float  # radians

    @property
    def cos_half_hfov(self) -> float:
        # MatterSim: double cos_half_hfov = cos(vfov * width / height / 2.0);
        return math.cos(self.vfov * self.width / self.height / 2.0)


# R2R / EnvDrop: setCameraResolution(640, 480), setCameraVFOV(math.radians(60)).
R2R_CAMERA = Camera(640, 480, math.radians(60))


class NavigableLocation(NamedTuple):
    """One of MatterSim's `state.navigableLocations[1:]` (x, y, z: the float32 position)."""

    viewpointId: str
    rel_heading: float
    rel_elevation: float
    rel_distance: float
    x: float
    y: float
    z: float


class Candidate(NamedTuple):
    """One of EnvDrop's `make_candidate` records (without scanId and feature)."""

    viewpointId: str
    pointId: int  # the view (0..35) the neighbour is seen closest to its centre from
    idx: int  # 1-based position in that view's navigableLocations
    heading: float  # view heading - base heading + rel_heading
    elevation: float  # view elevation + rel_elevation
    normalized_heading: float  # view heading + rel_heading
    distance: float  # sqrt(rel_heading^2 + rel_elevation^2) at that view
    rel_distance: float  # metres


def _lround(x: float) -> int:
    """C's lround: nearest integer, halves away from zero."""
    r = math.floor(abs(x))
    if abs(x) - r >= 0.5:
        r += 1
    return int(math.copysign(r, x)) if x < 0 else int(r)


def _normalize_heading(heading: float) -> float:
    # MatterSim: state->heading = fmod(heading, M_PI*2.0); while (< 0.0) += M_PI*2.0;
    h = math.fmod(float(heading), _TWO_PI)
    while h < 0.0:
        h += _TWO_PI
    return h


def start_view(heading: float) -> tuple[int, float]:
    """(viewIndex, state heading) after MatterSim's discretised `newEpisode(..., heading, 0)`."""
    step = _lround(_normalize_heading(heading) / HEADING_INCREMENT)
    if step == HEADING_COUNT:
        step = 0
    return HEADING_COUNT + step, float(step) * HEADING_INCREMENT


def view_angles(view_index: int) -> tuple[float, float]:
    """(heading, elevation) of a discretised view as MatterSim's state holds them."""
    if not 0 <= view_index < 3 * HEADING_COUNT:
        raise ValueError(f"view index {view_index} is not in 0..35")
    row, col = divmod(view_index, HEADING_COUNT)
    elevation = (-ELEVATION_INCREMENT, 0.0, ELEVATION_INCREMENT)[row]
    return float(col) * HEADING_INCREMENT, elevation


def _position32(graph: NavGraph, viewpoint: str) -> np.ndarray:
    return graph.position(viewpoint).astype(np.float32)


class _Geometry(NamedTuple):
    viewpointId: str
    tx: np.float32  # float32 target_dir with z zeroed
    ty: np.float32
    nx: np.float32  # glm::normalize(target_dir) (z = 0)
    ny: np.float32
    elevation: float  # atan2(tar_z, |target_dir_xy|), before subtracting the camera's
    distance: float  # glm::length(target_dir) (3D)
    pos: np.ndarray


def _length(x: np.float32, y: np.float32, z: np.float32) -> np.float32:
    # glm::length(v) = sqrt(dot(v, v)), dot(v, v) = (x*x + y*y) + z*z, all float32
    return np.sqrt((x * x + y * y) + z * z)


def _geometry(graph: NavGraph, viewpoint: str) -> list[_Geometry]:
    cache = graph.__dict__.setdefault("_view_geometry", {})
    if viewpoint in cache:
        return cache[viewpoint]
    here = _position32(graph, viewpoint)
    out = []
    for vp in graph.neighbors(viewpoint):  # unobstructed and included, file order, no self
        if vp == viewpoint:
            continue
        pos = _position32(graph, vp)
        t = pos - here  # float32 glm::vec3 subtraction
        tx, ty, tz = t[0], t[1], t[2]
        zero = _F32(0.0)
        distance = float(_length(tx, ty, tz))
        flat = _length(tx, ty, zero)
        elevation = math.atan2(float(tz), float(flat))
        # glm::normalize(v) = v * inversesqrt(dot(v, v)), inversesqrt(x) = 1 / sqrt(x)
        inv = _F32(1.0) / np.sqrt((tx * tx + ty * ty) + zero * zero)
        out.append(_Geometry(vp, tx, ty, tx * inv, ty * inv, elevation, distance, pos))
    cache[viewpoint] = out
    return out


def navigable(
    graph: NavGraph,
    viewpoint: str,
    heading: float,
    elevation: float,
    camera: Camera = R2R_CAMERA,
) -> list[NavigableLocation]:
    """MatterSim's `getState().navigableLocations[1:]` at `viewpoint` looking at
    (heading, elevation): the visible unobstructed neighbours, sorted by angular distance from
    the image centre (stable: ties keep graph order). The heading is normalised to [0, 2*pi)
    as MatterSim's state holds it; the elevation is used as given (no limits applied)."""
    heading = _normalize_heading(heading)
    elevation = float(elevation)
    adjusted = math.pi / 2.0 - heading
    # glm::vec3 camera_horizon_dir(cos(adjustedheading), sin(adjustedheading), 0.f);
    cx, cy = _F32(math.cos(adjusted)), _F32(math.sin(adjusted))
    zero = _F32(0.0)
    cos_half = camera.cos_half_hfov
    found = []
    for g in _geometry(graph, viewpoint):
        cos_angle = (g.nx * cx + g.ny * cy) + zero * zero  # glm::dot, float32
        if not float(cos_angle) >= cos_half:
            continue
        rel_heading = math.atan2(float(g.tx * cy - g.ty * cx), float(g.tx * cx + g.ty * cy))
        rel_elevation = g.elevation - elevation
        found.append(
            NavigableLocation(
                g.viewpointId,
                rel_heading,
                rel_elevation,
                g.distance,
                float(g.pos[0]),
                float(g.pos[1]),
                float(g.pos[2]),
            )
        )
    # ViewpointPtrComp: sqrt(h*h + e*e) < ...; Python's sort is stable like libstdc++'s
    # insertion sort for <= 16 elements.
    found.sort(
        key=lambda v: math.sqrt(v.rel_heading * v.rel_heading + v.rel_elevation * v.rel_elevation)
    )
    return found


class _Seen(NamedTuple):
    viewpointId: str
    pointId: int
    idx: int
    state_heading: float
    state_elevation: float
    rel_heading: float
    rel_elevation: float
    distance: float
    rel_distance: float


def _sweep(graph: NavGraph, viewpoint: str, camera: Camera) -> list[_Seen]:
    """EnvDrop's 36-view sweep: per neighbour the view closest (strict <) to it, in order of
    first appearance. Independent of the base view, so cached per (viewpoint, camera)."""
    cache = graph.__dict__.setdefault("_view_sweep", {})
    key = (viewpoint, camera)
    if key in cache:
        return cache[key]
    best: dict[str, _Seen] = {}
    for ix in range(3 * HEADING_COUNT):
        state_heading, state_elevation = view_angles(ix)
        for j, loc in enumerate(
            navigable(graph, viewpoint, state_heading, state_elevation, camera)
        ):
            distance = float(np.sqrt(loc.rel_heading**2 + loc.rel_elevation**2))
            if loc.viewpointId not in best or distance < best[loc.viewpointId].distance:
                best[loc.viewpointId] = _Seen(
                    loc.viewpointId,
                    ix,
                    j + 1,
                    state_heading,
                    state_elevation,
                    loc.rel_heading,
                    loc.rel_elevation,
                    distance,
                    loc.rel_distance,
                )
    cache[key] = out = list(best.values())
    return out


def candidates(
    graph: NavGraph, viewpoint: str, view_index: int, camera: Camera = R2R_CAMERA
) -> list[Candidate]:
    """EnvDrop's `make_candidate(feature, scan, viewpoint, view_index)` (first, unbuffered call):
    one record per neighbour visible from any of the 36 views."""
    view_angles(view_index)  # validates
    base_heading = (view_index % HEADING_COUNT) * math.radians(30)
    out = []
    for s in _sweep(graph, viewpoint, camera):
        heading = s.state_heading - base_heading
        out.append(
            Candidate(
                s.viewpointId,
                s.pointId,
                s.idx,
                heading + s.rel_heading,
                s.state_elevation + s.rel_elevation,
                s.state_heading + s.rel_heading,
                s.distance,
                s.rel_distance,
            )
        )
    return out


def candidate_table(
    graph: NavGraph, viewpoints: list[str] | None = None, camera: Camera = R2R_CAMERA
) -> dict[tuple[str, int], list[Candidate]]:
    """{(viewpoint, base column 0..11): candidates} for every (default: every included)
    viewpoint; `candidates(graph, vp, ix)` equals entry (vp, ix % 12). The sweep is computed
    once per viewpoint."""
    if viewpoints is None:
        viewpoints = [vp for vp in graph.viewpoints if graph.included[vp]]
    return {
        (vp, col): candidates(graph, vp, HEADING_COUNT + col, camera)
        for vp in viewpoints
        for col in range(HEADING_COUNT)
    }
