"""The image side of a V&L task run: where its features come from, in one interface.

- features mode: a frozen backbone's grid (or BottomUp regions) read from a feature store,
  extracted once into a cache keyed by the backbone's sha256 and the input size (resumable,
  rank-sharded); every store a run opens is checked against what the run expects;
- end2end: pixels in, the CLIP image tower frozen / LoRA-tuned / fully fine-tuned in its own
  learning-rate group (parameters named `backbone.*`).

Both give the heads `features (B, N, C)`, `mask (B, N)`, `spatial (B, N, 4)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.visual.backbone import GridBackbone
from cliptransfer.visual.extract import extract_grids, load_backbone, parse_size
from cliptransfer.visual.inputs import PixelInputs, StoreInputs
from cliptransfer.visual.region_import import import_regions
from cliptransfer.visual.store import FeatureStore, check_metadata

__all__ = ["FeatureConfig", "ImageSide", "image_side", "prepare_feature_store"]


@dataclass
class FeatureConfig:
    kind: Literal["clip-grid", "bottomup"] = "clip-grid"
    # An existing feature store (grid for clip-grid, regions for bottomup). Empty: clip-grid
    # extracts the backbone's grid into the cache; bottomup imports `tsv`, or on the Shapes world
    # builds BUTD-style region features (cliptransfer.worlds.shapes.bottomup) first.
    store: str = ""
    tsv: list[str] = dataclasses.field(default_factory=list)  # BUTD/LXMERT TSV or HDF5 file(s)
    cache_dir: str = ""  # default: <world>/features on Shapes, <out_dir>/features otherwise
    size: str = "180x240"  # HxW input of grid extraction and of end2end (CLIP-ViL: 600x1000)
    batch_size: int = 32  # extraction batch per process
    storage: Literal["float32", "float16"] = "float32"
    boxes: Literal["adaptive", "fixed36"] = "adaptive"  # Shapes bottomup: 10-100 or 36 boxes
    max_regions: int = 0  # keep the first N regions of each image; 0 keeps all


def _log(accelerator: Any, msg: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def _tsv_key(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        st = p.stat()
        digest.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _complete_store(
    accelerator: Any, path: Path, needed: Collection[str], expect: dict
) -> FeatureStore | None:
    """The store at `path` if it exists, fits `expect` and holds every id of `needed`: then the
    run only reads it (no writer, so concurrent runs can share a finished cache). Rank 0 decides
    for everyone, so all processes take the same path (and meet at the same barriers)."""
    store, complete = None, False
    if (path / "metadata.json").is_file():
        store = FeatureStore.open(path, expect=expect)
        complete = bool(needed) and all(i in store for i in needed)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        complete = broadcast_object_list([complete])[0]
    if not complete:
        return None
    return store if store is not None else FeatureStore.open(path, expect=expect)


def prepare_feature_store(
    accelerator: Any,
    cfg: FeatureConfig,
    backbone: str,
    images: Mapping[int | str, str | Path],
    cache_root: str | Path,
    world: str | Path | None = None,
    needed: Collection[str] = (),
    shapes_splits: tuple[str, ...] = ("train2014", "val2014"),
) -> FeatureStore:
    """Open (making it first when needed) the feature store the run reads.

    clip-grid: `cfg.store`, or `{cache_root}/clip-grid-{sha256[:16]}-{H}x{W}-{storage}` filled by
    `extract_grids` with the images of `images` (id -> file) that it does not hold yet; every
    process extracts its share. bottomup: `cfg.store`, or the TSV files of `cfg.tsv` imported into
    `{cache_root}/bottomup-{key}`, or (Shapes world) `build_bottomup_features(world, ...)` over
    the world's `shapes_splits` (COCO-style for VQA, "flickr30k" for SNLI-VE).
    A cached store that already holds every id of `needed` (default: the keys of `images`) is
    opened as it is.
    """
    cache_root = Path(cache_root)
    needed = [str(i) for i in (needed or images)]
    if cfg.kind not in ("clip-grid", "bottomup"):
        raise ValueError(f"features.kind must be 'clip-grid' or 'bottomup', got {cfg.kind!r}")
    if cfg.kind == "clip-grid":
        size = parse_size(cfg.size)
        _, name, sha = load_backbone(backbone)
        path = cache_root / f"clip-grid-{sha[:16]}-{size[0]}x{size[1]}-{cfg.storage}"
        expect = {"kind": "grid", "checkpoint_sha256": sha, "input_size": list(size)}
    else:
        expect = {"kind": "regions"}
    if cfg.store:
        # The same check as for the cache: a store of another backbone or input size would
        # train silently on the wrong features and record the wrong provenance.
        store = FeatureStore.open(cfg.store)
        check_metadata(store.metadata, expect, f"features.store={cfg.store}")
        return store
    if cfg.kind == "clip-grid":
        store = _complete_store(accelerator, path, needed, expect)
        if store is not None:
            return store
        _log(accelerator, f"grid features of {name} at {size[0]}x{size[1]} -> {path}")
        stats = extract_grids(
            backbone,
            [images[k] for k in sorted(images, key=str)],
            path,
            size,
            batch_size=cfg.batch_size,
            storage=cfg.storage,
            accelerator=accelerator,
            progress=True,
        )
        _log(accelerator, f"  {stats['already']} already stored, {stats['written']} extracted")
        return FeatureStore.open(path, expect=expect)
    if cfg.tsv:
        tsv = [Path(p) for p in cfg.tsv]
        for p in tsv:
            if not p.is_file():
                raise FileNotFoundError(f"features.tsv: region file {p} not found")
        path = cache_root / f"bottomup-{_tsv_key(tsv)}"
    elif world is not None:
        from cliptransfer.worlds.shapes.bottomup import bottomup_dir, build_bottomup_features

        out = bottomup_dir(cache_root, cfg.boxes)
        tsv, path = [out / f"{split}.tsv" for split in shapes_splits], out / "store"
    else:
        raise ValueError(
            "features.kind=bottomup needs features.store (a region store) or features.tsv "
            "(BUTD/LXMERT TSV files to import)"
        )
    store = _complete_store(accelerator, path, needed, {"kind": "regions"})
    if store is not None:
        return store
    if accelerator is None or accelerator.is_main_process:
        if not cfg.tsv:
            build_bottomup_features(
                world,
                out,
                boxes=cfg.boxes,
                splits=shapes_splits,
                log=lambda m: _log(accelerator, m),
            )
        stats = import_regions(tsv, path, storage=cfg.storage)  # resumable: skips stored ids
        _log(
            accelerator, f"regions -> {path}: {stats['written']} imported, {stats['already']} kept"
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return FeatureStore.open(path, expect={"kind": "regions"})


@dataclass
class ImageSide:
    """What a task's dataset and model need from the image side of a run."""

    inputs: Callable[[Any], dict[str, torch.Tensor]]  # image id -> {features, spatial}|{pixels}
    dim: int  # channels of the features the head sees
    info: dict[str, Any]  # for metrics.json: store metadata, or the end2end backbone
    backbone: nn.Module | None = None  # end2end: the GridBackbone
    available: Callable[[Any], bool] = lambda image_id: True  # features present for this id
    where: str = ""  # names the store (or image folder) in error messages


def image_side(
    accelerator: Any,
    cfg: FeatureConfig,
    mode: str,
    backbone: str,
    tuning: TuningConfig,
    files: Mapping[Any, str | Path],
    cache_root: str | Path,
    world: str | Path | None = None,
    needed: Collection[Any] = (),
    shapes_splits: tuple[str, ...] = ("train2014", "val2014"),
) -> ImageSide:
    """features mode: the feature store (`prepare_feature_store`; `needed` = the image ids the run
    reads); end2end: the pixels of `files` (image id -> path) at `cfg.size` and the CLIP image
    tower tuned as `tuning` says."""
    if mode == "features":
        store = prepare_feature_store(
            accelerator, cfg, backbone, files, cache_root, world, [str(i) for i in needed],
            shapes_splits,
        )  # fmt: skip
        inputs = StoreInputs(store, cfg.max_regions or None)
        return ImageSide(
            inputs,
            inputs.channels,
            dict(store.metadata, path=str(store.root)),
            available=lambda image_id: str(image_id) in store,
            where=f"feature store {store.root}",
        )
    if mode != "end2end":
        raise ValueError(f"mode must be 'features' or 'end2end', got {mode!r}")
    size = parse_size(cfg.size)
    clip, name, sha = load_backbone(backbone)
    grid = GridBackbone(clip, tuning)
    info = {"kind": "end2end", "backbone": name, "checkpoint_sha256": sha, "input_size": list(size)}
    return ImageSide(PixelInputs(files, size), grid.channels, info, grid)
