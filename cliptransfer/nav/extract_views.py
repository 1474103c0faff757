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
from cliptransfer.visual.extract import load_backbone, rank_shard
from cliptransfer.visual.store import FeatureStore

__all__ = ["clip_preprocess", "extract_views", "viewpoint_images"]


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


@torch.inference_mode()
def extract_views(backbone: Any, connectivity: str | Path, out: str | Path, *,
                  skyboxes: str | Path | None = None, views_dir: str | Path | None = None,
                  scans: list[str] | None = None, width: int = 640, height: int = 480,
                  vfov_deg: float = 60.0, accelerator: Any = None, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Fill the views store `out` for every included viewpoint of `scans`; returns counts."""
    if (skyboxes is None) == (views_dir is None):
        raise ValueError("give exactly one of skyboxes (a skybox folder) and views_dir (PNG views)")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    graphs = load_graphs(connectivity, scans or read_scans(connectivity))
    items = [(s, v) for s, g in graphs.items() for v in g.viewpoints if g.included[v]]
    clip, name, sha = load_backbone(backbone)
    clip = clip.to(device).eval()
    size = clip.image_size
    probe = clip.encode_image(torch.zeros(1, 3, size, size, device=device))
    meta = {"kind": "views", "views": NUM_VIEWS, "channels": int(probe.shape[-1]), "backbone": name,
            "checkpoint_sha256": sha, "feature": "clip_image_embedding", "input_size": size,
            "camera": {"width": width, "height": height, "vfov_deg": vfov_deg},
            "source": "skyboxes" if skyboxes else "pre-rendered views"}  # fmt: skip
    stats = {"store": str(out), "viewpoints": len(items), "written": 0, "already": 0}
    bar = None
    with FeatureStore.create(out, meta, rank=rank) as writer:
        todo = [it for it in rank_shard(items, rank, world) if view_key(*it) not in writer]
        stats["already"] = len(rank_shard(items, rank, world)) - len(todo)
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"views -> {out}", unit="viewpoint")
        for scan, vp in todo:
            imgs = viewpoint_images(
                scan, vp, graphs[scan].poses[vp].reshape(-1),
                skyboxes=Path(skyboxes) if skyboxes else None,
                views_dir=Path(views_dir) if views_dir else None,
                width=width, height=height, vfov=math.radians(vfov_deg),
            )  # fmt: skip
            pixels = torch.stack([clip_preprocess(im, size) for im in imgs]).to(device)
            writer.add(view_key(scan, vp), clip.encode_image(pixels).float().cpu())  # (36, D)
            stats["written"] += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return stats
