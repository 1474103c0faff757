"""`cliptransfer prepare houses`: the Shapes houses on disk, in the real Matterport / R2R / RxR
layouts, deterministic per seed (same seed -> same bytes), written atomically.

    <out>/r2r/connectivity/<scan>_connectivity.json, scans.txt     (what MatterSim loads)
    <out>/scans/<scan>/matterport_skybox_images/<vp>_skybox_small.jpg  (6-face strips)
    <out>/r2r/R2R_{train,val_seen,val_unseen}.json                 (3 instructions per path)
    <out>/rxr/rxr_{train,val_seen,val_unseen}_guide.jsonl.gz       (en-US, en-IN, hi-IN, te-IN)
    <out>/captions/views_{train,val}.jsonl + views/<scan>/<vp>_<ix>.jpg  (image-caption pairs)
    <out>/manifest.json                                            (written last)

Train and val_seen share the training houses (distinct start-goal pairs); val_unseen uses houses
absent from train. On 2 cores `--size small` (13 houses) generates in ~1 minute, `medium` (46
houses) in ~4, `large` (140 houses, the VLN default) in ~15.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cliptransfer.fileio import write_json
from cliptransfer.nav.graph import NavGraph, load_graphs
from cliptransfer.worlds.houses.captions import view_caption
from cliptransfer.worlds.houses.instructions import LANGUAGES, realize
from cliptransfer.worlds.houses.layout import House, sample_house, segment_blocked
from cliptransfer.worlds.houses.paths import PathSpec, plan_path, sample_paths
from cliptransfer.worlds.houses.raycast import pose_matrix, render_skybox
from cliptransfer.worlds.houses.stats import graph_stats, plan_stats, summarize, turn_word_walk
from cliptransfer.worlds.prepare import cache_dir, prepare_atomically

__all__ = [
    "GENERATOR_VERSION",
    "HOUSE_SIZES",
    "HouseSize",
    "default_houses_dir",
    "prepare_houses",
    "sample_houses",
]

GENERATOR = "cliptransfer.worlds.houses"
GENERATOR_VERSION = 2  # 2: en-IN "turn around at X", Hindi and Telugu turn wording
INSTRUCTIONS_PER_PATH = 3  # R2R
VIEW_SIZE = (128, 96)  # caption images: the 4:3 R2R camera at a small resolution
JPEG_QUALITY = 92


@dataclass(frozen=True)
class HouseSize:
    train_houses: int
    unseen_houses: int
    rows: int
    cols: int
    skybox: int  # face size N of the (N, 6N) strips
    train_paths: int  # per training house (R2R; RxR samples as many again)
    val_seen_paths: int  # per training house
    val_unseen_paths: int  # per unseen house
    caption_views: int  # captioned views per viewpoint


HOUSE_SIZES: dict[str, HouseSize] = {
    "tiny": HouseSize(2, 1, 2, 2, 48, 8, 2, 6, 1),
    "small": HouseSize(10, 3, 2, 3, 96, 40, 6, 20, 2),
    # The VLN default before `large`: as many episodes as `small` over 4x the houses. With 10
    # training houses the follower memorised them (68 % SR on its training episodes, ~40 % on
    # unseen houses, no better than without vision); more houses make vision generalise.
    "medium": HouseSize(40, 6, 2, 3, 96, 12, 6, 30, 2),
    # The VLN default: 3x medium's training houses with as many paths each (paths cost no
    # rendering) and 20 unseen houses with 40 paths each, so that val_unseen (2,400
    # instructions) is not decided by a few hard houses and paths (medium's six houses score
    # 32-47 % each, and its 540 instructions move a run's SR by +-3 points).
    "large": HouseSize(120, 20, 2, 3, 96, 12, 2, 40, 1),
}


def default_houses_dir(size: str = "small", seed: int = 0) -> Path:
    """`$CLIPTRANSFER_CACHE` (or ~/.cache/cliptransfer) / houses-{size}-seed{seed}-v{version}."""
    _check_size(size)
    return cache_dir() / f"houses-{size}-seed{seed}-v{GENERATOR_VERSION}"


def _check_size(size: str) -> HouseSize:
    if size not in HOUSE_SIZES:
        raise ValueError(f"unknown houses size {size!r}; choose one of {sorted(HOUSE_SIZES)}")
    return HOUSE_SIZES[size]


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
    # The namespace stays "houses-v1": version 2 changed only wording (en-IN / hi-IN / te-IN
    # turns), so houses, paths and the en-US R2R files are byte-identical to version 1's.
    return random.Random("/".join(["houses-v1", str(seed), *map(str, parts)]))


def connectivity_records(house: House) -> list[dict]:
    """Matterport's connectivity JSON: per viewpoint image_id, pose (16 floats row-major),
    included, visible / unobstructed (one flag per viewpoint, file order), height."""
    vps = house.viewpoints
    out = []
    for i, v in enumerate(vps):
        free = [((min(i, j), max(i, j)) in house.edges) for j in range(len(vps))]
        seen = [
            j != i and not segment_blocked(house.walls, v.x, v.y, w.x, w.y)
            and math.hypot(v.x - w.x, v.y - w.y) < 12.0
            for j, w in enumerate(vps)
        ]  # fmt: skip
        pose = pose_matrix(v.x, v.y, v.z, v.yaw).reshape(-1)
        out.append({"image_id": v.id, "pose": [round(float(p), 6) for p in pose],
                    "included": v.included, "visible": seen, "unobstructed": free,
                    "height": round(v.height, 6)})  # fmt: skip
    return out


def _dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _write_gz_lines(path: Path, records: list[dict]) -> None:
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: the same records give the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write("".join(_dump(r) + "\n" for r in records).encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _skybox_job(args: tuple[House, int, int, str]) -> None:
    house, index, n, path = args
    Image.fromarray(render_skybox(house, index, n)).save(path, quality=JPEG_QUALITY)


def _render_skyboxes(root: Path, houses: list[House], n: int, workers: int) -> int:
    jobs = []
    for h in houses:
        folder = root / "scans" / h.scan / "matterport_skybox_images"
        folder.mkdir(parents=True, exist_ok=True)
        jobs += [(h, i, n, str(folder / f"{v.id}_skybox_small.jpg"))
                 for i, v in enumerate(h.viewpoints)]  # fmt: skip
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_skybox_job, jobs, chunksize=8))
    else:
        for job in jobs:
            _skybox_job(job)
    return len(jobs)


def _stat_row(graph: NavGraph, spec: PathSpec, plan: list, text: str, dataset: str,
              language: str) -> dict:  # fmt: skip
    return {"dataset": dataset, "language": language, "words": len(text.split()),
            "path_vps": len(spec.path), "path_m": spec.distance,
            "turn_words_reach_goal": turn_word_walk(graph, spec.path, spec.heading, plan),
            **plan_stats(plan)}  # fmt: skip


def _episodes(house: House, graph: NavGraph, specs: list[PathSpec], seed: int, split: str,
              first_id: int, stats: list[dict]) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """R2R records (3 en-US instructions per path) and RxR guide lines (one per language);
    one row per instruction appended to `stats`."""
    r2r, rxr = [], []
    for k, spec in enumerate(specs):
        path_id = first_id + k
        r2r_texts = []
        for j in range(INSTRUCTIONS_PER_PATH):
            rng = _rng(seed, "r2r", split, path_id, j)
            plan = plan_path(house, graph, spec, rng)
            r2r_texts.append(realize(plan, "en-US", rng))
            stats.append(_stat_row(graph, spec, plan, r2r_texts[-1], "r2r", "en-US"))
        r2r.append({"distance": round(spec.distance, 6), "scan": house.scan, "path_id": path_id,
                    "path": spec.path, "heading": spec.heading, "instructions": r2r_texts})  # fmt: skip
        for j, language in enumerate(LANGUAGES):
            rng = _rng(seed, "rxr", split, path_id, language)
            plan = plan_path(house, graph, spec, rng)
            text = realize(plan, language, rng)
            stats.append(_stat_row(graph, spec, plan, text, "rxr", language))
            rxr.append({"instruction_id": path_id * len(LANGUAGES) + j, "path_id": path_id,
                        "scan": house.scan, "path": spec.path, "heading": spec.heading,
                        "instruction": text, "language": language,
                        "annotator_id": rng.randrange(100)})  # fmt: skip
    return r2r, rxr


def _captions(root: Path, houses: list[House], graphs: dict[str, NavGraph], per_vp: int,
              seed: int, split: str) -> list[dict]:  # fmt: skip
    from cliptransfer.nav.render import render_view
    from cliptransfer.nav.views import view_angles

    rows = []
    for h in houses:
        folder = root / "captions" / "views" / h.scan
        folder.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(h.viewpoints):
            rng = _rng(seed, "caption", h.scan, v.id)
            skybox = root / "scans" / h.scan / "matterport_skybox_images"
            strip = np.asarray(Image.open(skybox / f"{v.id}_skybox_small.jpg").convert("RGB"))
            pose = graphs[h.scan].poses[v.id].reshape(-1)
            for ix in rng.sample(range(12, 24), per_vp):  # horizon row: where landmarks are
                heading, elevation = view_angles(ix)
                img = render_view(strip, pose, heading, elevation, width=VIEW_SIZE[0],
                                  height=VIEW_SIZE[1])  # fmt: skip
                name = f"{v.id}_{ix}.jpg"
                Image.fromarray(img).save(folder / name, quality=JPEG_QUALITY)
                caption = view_caption(h, i, heading, rng)
                rows.append({"image": f"views/{h.scan}/{name}", "caption": caption,
                             "scan": h.scan, "viewpoint": v.id, "view": ix})  # fmt: skip
    return rows


def sample_houses(size: str, seed: int) -> list[House]:
    """The floor plans of preset `size` (training houses first, then the unseen ones), exactly
    as `prepare_houses` draws them: geometry only, nothing rendered or written."""
    spec = _check_size(size)
    n_houses = spec.train_houses + spec.unseen_houses
    return [sample_house(_rng(seed, "house", k), spec.rows, spec.cols) for k in range(n_houses)]


def _generate(root: Path, size: str, spec: HouseSize, seed: int, workers: int) -> None:
    houses = sample_houses(size, seed)
    n_houses = len(houses)
    train, unseen = houses[: spec.train_houses], houses[spec.train_houses :]
    conn = root / "r2r" / "connectivity"
    conn.mkdir(parents=True)
    for h in houses:
        (conn / f"{h.scan}_connectivity.json").write_text(_dump(connectivity_records(h)))
    (conn / "scans.txt").write_text("".join(h.scan + "\n" for h in houses))
    graphs = load_graphs(conn)
    counts: dict[str, int] = {
        "houses": n_houses,
        "viewpoints": sum(len(h.viewpoints) for h in houses),
    }
    counts["skyboxes"] = _render_skyboxes(root, houses, spec.skybox, workers)

    splits: dict[str, tuple[list[dict], list[dict]]] = {s: ([], []) for s in
                                                         ("train", "val_seen", "val_unseen")}  # fmt: skip
    next_id, stat_rows = 1, []
    for split, group, per_house in (("train", train, spec.train_paths),
                                    ("val_unseen", unseen, spec.val_unseen_paths)):  # fmt: skip
        for h in group:
            g = graphs[h.scan]
            rng = _rng(seed, "paths", split, h.scan)
            specs = sample_paths(g, rng, per_house)
            r2r, rxr = _episodes(h, g, specs, seed, split, next_id, stat_rows)
            next_id += len(specs)
            splits[split][0].extend(r2r)
            splits[split][1].extend(rxr)
            if split == "train":  # val_seen: other start-goal pairs of the same houses
                taken = {(s.path[0], s.path[-1]) for s in specs}
                rng = _rng(seed, "paths", "val_seen", h.scan)
                seen_specs = sample_paths(g, rng, spec.val_seen_paths, exclude=taken)
                r2r, rxr = _episodes(h, g, seen_specs, seed, "val_seen", next_id, stat_rows)
                next_id += len(seen_specs)
                splits["val_seen"][0].extend(r2r)
                splits["val_seen"][1].extend(rxr)
    for split, (r2r, rxr) in splits.items():
        (root / "r2r" / f"R2R_{split}.json").write_text(_dump(r2r))
        _write_gz_lines(root / "rxr" / f"rxr_{split}_guide.jsonl.gz", rxr)
        counts[f"R2R_{split}"] = sum(len(r["instructions"]) for r in r2r)
        counts[f"rxr_{split}"] = len(rxr)

    for split, group in (("train", train), ("val", unseen)):
        rows = _captions(root, group, graphs, spec.caption_views, seed, split)
        path = root / "captions" / f"views_{split}.jsonl"
        path.write_text("".join(_dump(r) + "\n" for r in rows), encoding="utf-8")
        counts[f"captions_{split}"] = len(rows)

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    manifest = {"generator": GENERATOR, "version": GENERATOR_VERSION, "size": size, "seed": seed,
                "preset": asdict(spec), "splits": {"train": [h.scan for h in train],
                                                   "val_unseen": [h.scan for h in unseen]},
                "counts": counts, "stats": {"graph": graph_stats(graphs),
                                            "instructions": summarize(stat_rows)},
                "files": files}  # fmt: skip
    write_json(root / "manifest.json", manifest, indent=1)


def prepare_houses(out: str | Path, size: str = "small", seed: int = 0, *,
                   overwrite: bool = False, workers: int | None = None) -> Path:  # fmt: skip
    """Generate the Shapes houses of preset `size` into `out` (a no-op if already there)."""
    spec = _check_size(size)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    identity = {"size": size, "seed": seed, "version": GENERATOR_VERSION}
    return prepare_atomically(out, GENERATOR, identity,
                              lambda tmp: _generate(tmp, size, spec, seed, workers),
                              overwrite=overwrite, what="Shapes houses")  # fmt: skip
