"""Grid feature extraction with a CLIP image tower into a feature store, resumable and sharded.

Preprocessing: every image is resized to exactly (H, W) (bicubic on the PIL image, which
antialiases like OpenAI's `Resize`) and normalised with OpenAI's mean/std, so every record has
the same grid (600x1000 -> 18x31 for RN50). CLIP-ViL itself kept the aspect ratio with
detectron2's shortest-side-600 / longest-side-1000 resize, giving a different grid per image; a
fixed size keeps batches dense and the store's records equal-sized.

Features are computed in fp32 unless `dtype="bfloat16"` opts into autocast (OpenAI's loader
defaults to fp16 -- a silent precision change we do not copy). Each Accelerate process takes
every world-th image and writes its own shards; images already stored are skipped, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cliptransfer.clip import grid as grid_ops
from cliptransfer.clip.inference import inference_tower
from cliptransfer.contrastive.augment import OPENAI_MEAN, OPENAI_STD, to_tensor
from cliptransfer.contrastive.pairs import open_image
from cliptransfer.engine.distributed import world_info

from .store import DEFAULT_SHARD_BYTES, FeatureStore, canonical_image_id

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "extract_grids",
    "list_images",
    "load_backbone",
    "parse_size",
    "preprocess",
    "rank_shard",
    "weights_sha256",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
COMPUTE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16}  # fmt: skip
STORAGE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"}
# Metadata that may change between runs of one store without changing the features.
INFORMATIONAL_KEYS = ("backbone", "fast_path")


class ImageReadError(OSError):
    """An image file that cannot be decoded."""


def parse_size(size: str | Sequence[int]) -> tuple[int, int]:
    """ "600x1000" (H x W, CLIP-ViL's notation) or (600, 1000) -> (600, 1000)."""
    parts = size.lower().split("x") if isinstance(size, str) else list(size)
    try:
        h, w = (int(v) for v in parts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"size must be HxW like 600x1000, got {size!r}") from e
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def list_images(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a folder (recursive, sorted) or an explicit list (kept in order)."""
    if isinstance(images, (str, Path)):
        root = Path(images)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return files
    files = [Path(p) for p in images]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}")
    return files


def rank_shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's part: every world_size-th item from `rank` (disjoint, covers everything)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return list(items[rank::world_size])


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a model folder's weight files (names + contents)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        if not files:
            raise FileNotFoundError(f"no weight files (.safetensors/.bin/.pt) in {path}")
    digest = hashlib.sha256()
    for f in files:
        file_hash = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                file_hash.update(block)
        if len(files) == 1:
            return file_hash.hexdigest()
        digest.update(f"{f.name}:{file_hash.hexdigest()}\n".encode())
    return digest.hexdigest()


def _state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_backbone(backbone: Any) -> tuple[torch.nn.Module, str, str]:
    """(model, name, sha256) for a CLIP module, "default", a checkpoint path or an arch name.

    An architecture name (e.g. "RN50") builds a randomly initialised model (seed 0): the
    random-backbone baseline. The sha256 is of the weights file, or of the state dict.
    """
    from cliptransfer.clip import create_clip, list_archs, load_clip
    from cliptransfer.defaults import DEFAULT_CLIP, resolve_clip

    if isinstance(backbone, torch.nn.Module):
        return backbone, type(backbone).__name__, _state_sha256(backbone)
    name = str(backbone)
    if name == "default":
        return resolve_clip("default"), name, weights_sha256(DEFAULT_CLIP)
    if Path(name).exists():
        return load_clip(name), name, weights_sha256(name)
    if name in list_archs():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_clip(name).eval()
        return model, f"{name} (random init, seed 0)", _state_sha256(model)
    raise FileNotFoundError(
        f"backbone {name!r} is neither a checkpoint path, 'default', nor an architecture "
        f"({', '.join(list_archs())})"
    )


def preprocess(
    img: Image.Image,
    size: tuple[int, int],
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """PIL image -> normalised (3, H, W) float tensor, resized to exactly `size` = (H, W)."""
    h, w = size
    x = to_tensor(img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class _Images(Dataset):
    def __init__(self, files: list[Path], size: tuple[int, int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        try:
            img = open_image(str(self.files[i]))
        except Exception as e:
            raise ImageReadError(f"{self.files[i]}: cannot decode image: {e}") from e
        return preprocess(img, self.size), i, img.width, img.height


@torch.no_grad()
def extract_grids(
    backbone: Any,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    size: tuple[int, int] | str = (600, 1000),
    batch_size: int = 8,
    dtype: str = "float32",
    storage: str = "float32",
    accelerator: Any = None,
    *,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | torch.device | None = None,
    coco_ids: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    fast: bool = True,
) -> dict[str, Any]:
    """Extract (H*W, C) grid features of every image into the store `out`; returns counts.

    `fast` runs an inference copy of the tower (`models.inference`: ResNet BatchNorm folded into
    the convs, channels_last; equal to the plain forward within float rounding).

    `backbone`: checkpoint path, "default", arch name or CLIP module (see `load_backbone`).
    `size` (H, W) or "HxW". `dtype` "float32" (default) or "bfloat16" (autocast). `storage`
    "float32" or "float16" (read back as float32). Ranks/device come from `accelerator`, else
    `rank`/`world_size`/`device`, else torch.distributed. Image ids are file stems, with COCO
    names reduced to their integer id ("COCO_train2014_000000000123" -> "123") if `coco_ids`.
    """
    size = parse_size(size)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}")
    if storage not in STORAGE_ALIASES:
        raise ValueError(f"storage must be one of {list(STORAGE_ALIASES)}, got {storage!r}")
    compute = COMPUTE_DTYPES[dtype]
    if accelerator is not None:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        device = accelerator.device
    else:
        dist_rank, dist_world = world_info()
        rank = dist_rank if rank is None else rank
        world_size = dist_world if world_size is None else world_size
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)

    files = list_images(images)
    ids = [canonical_image_id(p.stem) if coco_ids else p.stem for p in files]
    seen: dict[str, Path] = {}
    for i, p in zip(ids, files):
        if i in seen:
            raise ValueError(f"images {seen[i]} and {p} both map to image id {i!r}")
        seen[i] = p

    model, name, sha = load_backbone(backbone)
    model = model.to(device).eval()
    autocast = None if compute == torch.float32 else compute
    # BatchNorm folded into the convs + channels_last (ResNets): 1.1-1.3x, same features to ~1e-6
    tower, channels_last = inference_tower(model.visual) if fast else (model.visual, False)

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(
                device.type, dtype=autocast or torch.float32, enabled=autocast is not None
            ),
        ):
            return grid_ops.encode_grid(tower, pixels)  # (B, H*W, C), (H, W)

    probe, grid_hw = encode(torch.zeros(1, 3, *size, device=device))
    vision = model.config.vision
    meta = {
        "kind": "grid",
        "backbone": name,
        "checkpoint_sha256": sha,
        "vision": {"kind": vision.kind, "width": vision.width, "layers": vision.layers},
        "layer": "layer4" if vision.kind == "resnet" else "final_norm",
        "input_size": list(size),
        "grid_size": list(grid_hw),
        "channels": int(probe.shape[-1]),
        "resize": "bicubic-exact",
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "compute_dtype": "float32" if autocast is None else "bfloat16",
        "fast_path": bool(fast),
        "dtype": STORAGE_ALIASES[storage],
    }
    stats = {"store": str(out), "rank": rank, "world_size": world_size, "images": len(files)}
    mine = rank_shard(list(range(len(files))), rank, world_size)
    with FeatureStore.create(
        out, meta, rank=rank, shard_bytes=shard_bytes, ignore_keys=INFORMATIONAL_KEYS
    ) as writer:
        todo = [i for i in mine if ids[i] not in writer]
        stats.update(assigned=len(mine), already=len(mine) - len(todo), written=0)
        loader = DataLoader(
            _Images([files[i] for i in todo], size),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"grid features -> {out}", unit="img")
        for pixels, idx, widths, heights in loader:
            feats, hw = encode(pixels.to(device, non_blocking=True))
            if tuple(hw) != tuple(grid_hw):
                raise RuntimeError(f"grid {hw} differs from the probe's {grid_hw}")
            feats = feats.float().cpu()  # (B, H*W, C)
            for k, j in enumerate(idx.tolist()):
                i = todo[j]
                writer.add(ids[i], feats[k], image_w=int(widths[k]), image_h=int(heights[k]))
            stats["written"] += len(idx)
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif world_info()[1] > 1:
        torch.distributed.barrier()
    return stats
