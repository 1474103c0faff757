"""`cliptransfer extract views`: every viewpoint's 36 views, rendered from its skybox as MatterSim
renders them (or read from pre-rendered `<scan>/<vp>_<ix>.png`), encoded by a CLIP image tower
(the projected embedding, fp32, as CLIP-ViL's VLN features), into a "views" feature store keyed
"{scan}_{viewpoint}". Resumable (stored keys are skipped) and sharded over processes like
`extract grid`. The pixels are MatterSim's `state.rgb` as they are (CLIP-ViL's precompute script
feeds them unflipped), preprocessed as OpenAI CLIP's: bicubic resize of the short side, centre
crop, normalise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cliptransfer.contrastive.augment import OPENAI_MEAN, OPENAI_STD
from cliptransfer.nav.graph import load_graphs, read_scans
from cliptransfer.nav.render import find_skybox, load_skybox, render_view
from cliptransfer.nav.view_features import NUM_VIEWS, view_key
from cliptransfer.nav.views import view_angles
from cliptransfer.visual.extract import INFORMATIONAL_KEYS, load_backbone, rank_shard
from cliptransfer.visual.store import FeatureStore

__all__ = [
    "ClipViewEncoder",
    "RegionViewEncoder",
    "ViewEncoder",
    "clip_preprocess",
    "extract_views",
    "viewpoint_images",
]


def clip_preprocess(img: np.ndarray, size: int) -> torch.Tensor:
    """OpenAI CLIP's eval preprocessing of an (H, W, 3) uint8 RGB array -> (3, size, size)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    pil = TF.resize(Image.fromarray(img), size, interpolation=InterpolationMode.BICUBIC)
    x = TF.to_tensor(TF.center_crop(pil, [size, size]))
    return TF.normalize(x, list(OPENAI_MEAN), list(OPENAI_STD))


def viewpoint_images(scan: str, vp: str, pose: np.ndarray, *, skyboxes: Path | None,
                     views_dir: Path | None, width: int, height: int, vfov: float) -> list[np.ndarray]:  # fmt: skip
    """The 36 (H, W, 3) RGB views of one viewpoint, view index order."""
    if views_dir is not None:
        out = []
        for ix in range(NUM_VIEWS):
            p = views_dir / scan / f"{vp}_{ix}.png"
            if not p.is_file():
                raise FileNotFoundError(f"pre-rendered view {p} not found")
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB")))
        return out
    found = find_skybox(skyboxes, scan, vp)
    if found is None:
        raise FileNotFoundError(f"no skybox for {scan} {vp} under {skyboxes} "
                                f"(<scan>/matterport_skybox_images/{vp}_skybox_small.jpg)")  # fmt: skip
    faces = load_skybox(found)
    return [render_view(faces, pose, *view_angles(ix), width=width, height=height, vfov=vfov)
            for ix in range(NUM_VIEWS)]  # fmt: skip


class ViewEncoder(ABC):
    """Encodes a viewpoint's 36 (H, W, 3) uint8 views -> (36, D); `meta` describes the features
    for the store (backbone, checkpoint sha256, feature, input size, channels)."""

    def __init__(self, module: torch.nn.Module, meta: dict[str, Any]) -> None:
        self.module, self.meta = module.eval(), meta

    def to(self, device: torch.device) -> ViewEncoder:
        self.module = self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @abstractmethod
    def __call__(self, images: list[np.ndarray]) -> torch.Tensor: ...


class ClipViewEncoder(ViewEncoder):
    """CLIP-ViL's features: the projected CLIP image embedding of each view (fp32)."""

    def __init__(self, backbone: Any) -> None:
        clip, name, sha = load_backbone(backbone)
        size = clip.image_size
        dim = int(clip.encode_image(torch.zeros(1, 3, size, size)).shape[-1])
        super().__init__(clip, {"backbone": name, "checkpoint_sha256": sha, "channels": dim,
                                "feature": "clip_image_embedding", "input_size": size})  # fmt: skip

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        size = self.meta["input_size"]
        pixels = torch.stack([clip_preprocess(im, size) for im in images]).to(self.device)
        return self.module.encode_image(pixels).float()  # (36, D)


class RegionViewEncoder(ViewEncoder):
    """A supervised in-domain backbone's pooled features (EnvDrop's ImageNet ResNet-152 pool5, on
    the Shapes world): the detector analogue's pool5 of the whole-view box, on the view as it is
    (no crop; the detector was trained on whole 160x120 scenes)."""

    def __init__(self, model_dir: str | Path) -> None:
        from cliptransfer.visual.extract import weights_sha256
        from cliptransfer.worlds.shapes.region_model import WEIGHTS_NAME, load_region_model

        model, _ = load_region_model(model_dir)
        super().__init__(model, {"backbone": f"shapes region model ({model_dir})",
                                 "checkpoint_sha256": weights_sha256(Path(model_dir) / WEIGHTS_NAME),
                                 "channels": model.cfg.dim, "feature": "region_pool5_whole_view",
                                 "input_size": None})  # fmt: skip

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        n, _, h, w = pixels.shape  # (36, 3, H, W) uint8
        rois = torch.tensor([[i, 0.0, 0.0, w, h] for i in range(n)], device=self.device)
        return self.module.pool5(self.module.feature_map(pixels), rois).float()  # (36, D)


@torch.inference_mode()
def extract_views(encoder: Any, connectivity: str | Path, out: str | Path, *,
                  skyboxes: str | Path | None = None, views_dir: str | Path | None = None,
                  scans: list[str] | None = None, width: int = 640, height: int = 480,
                  vfov_deg: float = 60.0, accelerator: Any = None, progress: bool = False,
                  workers: int = 0) -> dict[str, Any]:  # fmt: skip
    """Fill the views store `out` for every included viewpoint of `scans`; returns counts.
    `encoder`: a `ViewEncoder`, or a CLIP backbone (module, "default", checkpoint, arch name).
    `workers` > 0 renders the views in that many processes while this one encodes (the same
    pixels; rendering is numpy on one core, so on CPU it costs as much as the encoder)."""
    if (skyboxes is None) == (views_dir is None):
        raise ValueError("give exactly one of skyboxes (a skybox folder) and views_dir (PNG views)")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    graphs = load_graphs(connectivity, scans or read_scans(connectivity))
    items = [(s, v) for s, g in graphs.items() for v in g.viewpoints if g.included[v]]
    if not isinstance(encoder, ViewEncoder):
        encoder = ClipViewEncoder(encoder)
    encoder.to(device)
    meta = {"kind": "views", "views": NUM_VIEWS, **encoder.meta,
            "camera": {"width": width, "height": height, "vfov_deg": vfov_deg},
            "source": "skyboxes" if skyboxes else "pre-rendered views"}  # fmt: skip
    stats = {"store": str(out), "viewpoints": len(items), "written": 0, "already": 0}
    bar = None
    # The backbone's label (it names a folder) may change with the same weights: informational.
    with FeatureStore.create(out, meta, rank=rank, ignore_keys=INFORMATIONAL_KEYS) as writer:
        todo = [it for it in rank_shard(items, rank, world) if view_key(*it) not in writer]
        stats["already"] = len(rank_shard(items, rank, world)) - len(todo)
        if progress and rank == 0 and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"views -> {out}", unit="viewpoint")
        render = partial(_render_viewpoint, skyboxes=Path(skyboxes) if skyboxes else None,
                         views_dir=Path(views_dir) if views_dir else None, width=width,
                         height=height, vfov=math.radians(vfov_deg))  # fmt: skip
        jobs = [(scan, vp, graphs[scan].poses[vp].reshape(-1)) for scan, vp in todo]
        for (scan, vp, _), imgs in zip(jobs, _in_order(render, jobs, workers), strict=True):
            writer.add(view_key(scan, vp), encoder(imgs).cpu())  # (36, D)
            stats["written"] += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return stats


def _render_viewpoint(job: tuple[str, str, np.ndarray], **kw: Any) -> list[np.ndarray]:
    scan, vp, pose = job
    return viewpoint_images(scan, vp, pose, **kw)


def _in_order(fn: Any, jobs: list, workers: int) -> Iterator:
    """fn(job) for each job, in order; with workers > 0 computed in that many processes, at
    most 2 per worker ahead (a 640x480 viewpoint is 33 MB of pixels)."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
