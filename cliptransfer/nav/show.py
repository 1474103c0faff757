"""`cliptransfer show-episode`: a picture of one episode — the house graph from above with the
gold path and (optionally) a predicted trajectory, the instruction, and the start panorama when
the skyboxes are at hand (36 views rendered like MatterSim; its rows are upright as they are)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from cliptransfer.fileio import atomic_write_bytes, read_json
from cliptransfer.nav.episodes import Episode, load_r2r, load_rxr
from cliptransfer.nav.graph import NavGraph, load_graphs
from cliptransfer.nav.render import find_skybox, load_skybox, render_view
from cliptransfer.nav.views import start_view, view_angles

__all__ = ["episode_png", "show_episode"]


def episode_png(graph: NavGraph, ep: Episode, trajectory: list[str] | None = None,
                skyboxes: Path | None = None) -> bytes:  # fmt: skip
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sky = find_skybox(skyboxes, ep.scan, ep.start) if skyboxes else None
    fig = Figure(figsize=(12, 9 if sky else 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if sky else 1, 1, 1)
    pos = {v: graph.position(v) for v in graph.viewpoints if graph.included[v]}
    for a in pos:
        for b, _ in graph.adjacency[a]:
            if a < b:
                ax.plot(*zip(pos[a][:2], pos[b][:2]), color="0.85", lw=0.8, zorder=1)
    xy = np.array([p[:2] for p in pos.values()])
    ax.scatter(xy[:, 0], xy[:, 1], s=8, color="0.6", zorder=2)
    gold = np.array([pos[v][:2] for v in ep.path])
    ax.plot(gold[:, 0], gold[:, 1], "-o", color="tab:green", lw=2.5, label="gold path", zorder=3)
    if trajectory:
        walk = [v for i, v in enumerate(trajectory) if i == 0 or v != trajectory[i - 1]]
        pred = np.array([pos[v][:2] for v in walk])
        ax.plot(pred[:, 0], pred[:, 1], "--o", color="tab:red", lw=1.8, label="predicted", zorder=4)
    ax.scatter(*gold[0], s=120, marker="*", color="black", zorder=5, label="start")
    ax.annotate("", xy=gold[0] + 1.2 * np.array([math.sin(ep.heading), math.cos(ep.heading)]),
                xytext=gold[0], arrowprops={"arrowstyle": "->", "lw": 1.5})  # fmt: skip
    ax.set_aspect("equal")
    ax.legend(loc="best", fontsize="small")
    ax.set_title(f"{ep.instr_id} · scan {ep.scan}\n" + "\n".join(textwrap.wrap(ep.instruction, 110)),
                 fontsize=9, loc="left")  # fmt: skip
    if sky:
        view_ix = start_view(ep.heading)[0]
        faces = load_skybox(sky)  # read once, rendered 36 times
        tiles = []
        for row in (2, 1, 0):  # looking up on top
            views = []
            for col in range(12):
                h, e = view_angles(12 * row + col)
                img = render_view(
                    faces, graph.poses[ep.start].reshape(-1), h, e, width=128, height=96
                )  # upright as MatterSim's state.rgb
                if 12 * row + col == view_ix:
                    img = img.copy()
                    img[:3], img[-3:], img[:, :3], img[:, -3:] = 255, 255, 255, 255
                views.append(img)
            tiles.append(np.concatenate(views, axis=1))
        pano = fig.add_subplot(2, 1, 2)
        pano.imshow(np.concatenate(tiles, axis=0))
        pano.set_axis_off()
        pano.set_title("the 36 views at the start (framed: the start view)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def show_episode(episodes: str | Path, connectivity: str | Path, instr_id: str, out: str | Path,
                 results: str | Path | None = None, skyboxes: str | Path | None = None) -> Path:  # fmt: skip
    """Write the episode's PNG to `out`; errors name the file and the missing id."""
    path = Path(episodes)
    eps = load_rxr(path) if ".jsonl" in path.name else load_r2r(path)
    by_id = {e.instr_id: e for e in eps}
    if instr_id not in by_id:
        raise KeyError(f"{path}: no episode with instr_id {instr_id!r}")
    ep = by_id[instr_id]
    graph = load_graphs(connectivity, [ep.scan])[ep.scan]
    trajectory = None
    if results is not None:
        rows = {str(r["instr_id"]): r for r in read_json(results, what="navigation results")}
        if instr_id not in rows:
            raise KeyError(f"{results}: no trajectory for instr_id {instr_id!r}")
        trajectory = [step[0] for step in rows[instr_id]["trajectory"]]
    png = episode_png(graph, ep, trajectory, Path(skyboxes) if skyboxes else None)
    atomic_write_bytes(out, png)
    return Path(out)
