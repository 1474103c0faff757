"""`extract_grids` end to end on generated JPEGs vs the forward pass it runs, for grid_extract.py
(run as `python bench/grid_extract.py`, so this folder is on sys.path)."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cliptransfer.clip import CLIP
from cliptransfer.clip.grid import encode_grid
from cliptransfer.clip.inference import inference_tower
from cliptransfer.contrastive.pairs import open_image
from cliptransfer.visual.extract import extract_grids, load_backbone, preprocess
from cliptransfer.visual.store import FeatureStore


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """n smooth random RGB JPEGs of (H, W) = size (quality 90): upsampled noise, so the files
    are photo-sized (~50-150 KB at 480x640) rather than incompressible noise."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        small = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (size[0], size[1], 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        path = folder / f"img_{i:05d}.jpg"
        img.save(path, quality=90)
        files.append(path)
    return files


def bench_extract(
    arch: str, ours: CLIP, args: argparse.Namespace, size: tuple[int, int], root: Path, bf16: bool
) -> list[str]:
    """extract_grids end to end (its default fast path; dtype bfloat16 with `bf16`) vs the same
    forward alone on the same images, preprocessed beforehand; interleaved."""
    n = args.extract_images
    folder = root / f"{arch}-jpeg"
    folder.mkdir()
    files = write_jpegs(folder, n, args.jpeg_size, args.seed)
    mb = sum(f.stat().st_size for f in files) / 2**20
    times: dict[str, list[float]] = {"forward": [], "extract": []}
    parts: dict[str, list[float]] = {"decode": [], "hash": [], "probe": [], "write": []}

    dtype = "bfloat16" if bf16 else "float32"
    tower, channels_last = inference_tower(ours.visual)

    def encode(x: torch.Tensor) -> torch.Tensor:
        # What extract_grids runs per batch (fast path, dtype), on already preprocessed pixels.
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return encode_grid(tower, x)[0]

    def forward(pixels: torch.Tensor) -> None:
        for s in range(0, n, args.batch):
            encode(pixels[s : s + args.batch])

    def extract(out: Path) -> None:
        stats = extract_grids(ours, folder, out, size=size, batch_size=args.batch, dtype=dtype)
        assert stats["written"] == n, stats

    for r in range(args.extract_repeats):
        start = time.perf_counter()
        pixels = torch.stack([preprocess(open_image(str(f)), size) for f in files])
        parts["decode"].append(time.perf_counter() - start)
        calls = [("forward", forward, pixels), ("extract", extract, root / f"store-{arch}-{r}")]
        for name, fn, arg in calls[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            fn(arg)
            times[name].append(time.perf_counter() - start)
            print(f"  {arch} {name} x{n}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        # The fixed per-call parts of extract_grids, timed alone.
        start = time.perf_counter()
        load_backbone(ours)  # sha256 of the state dict, for the store's metadata
        parts["hash"].append(time.perf_counter() - start)
        start = time.perf_counter()
        probe = encode(torch.zeros(1, 3, *size)).float()  # its grid-size probe
        parts["probe"].append(time.perf_counter() - start)
        feats = probe.expand(n, -1, -1)
        start = time.perf_counter()
        meta = {"kind": "grid", "grid_size": [1, feats.shape[1]], "channels": feats.shape[2]}
        with FeatureStore.create(root / f"write-{arch}-{r}", meta) as writer:
            for i in range(n):
                writer.add(str(i), feats[i], image_w=args.jpeg_size[1], image_h=args.jpeg_size[0])
        parts["write"].append(time.perf_counter() - start)
        shutil.rmtree(root / f"store-{arch}-{r}")
        shutil.rmtree(root / f"write-{arch}-{r}")
    fwd, ext = statistics.median(times["forward"]), statistics.median(times["extract"])
    med = {k: statistics.median(v) for k, v in parts.items()}
    print(
        f"[{arch}] extract_grids on {n} JPEGs ({args.jpeg_size[0]}x{args.jpeg_size[1]}, "
        f"{mb:.1f} MB) at {size[0]}x{size[1]}, batch {args.batch}, {dtype}: forward alone {fwd:.2f} s, "
        f"extract_grids {ext:.2f} s; parts timed alone add up to "
        f"{fwd + sum(med.values()):.2f} s",
        flush=True,
    )
    # One row: end-to-end throughput, then the parts: per call (paid once per extract_grids
    # call, i.e. per rank and per resume) and per image.
    return [
        f"| {arch} | {size[0]}x{size[1]} | {n} | {n / fwd:.3g} | {n / ext:.3g} | "
        f"**{fwd / ext:.2f}x** | {med['hash']:.2g} | {med['probe']:.3g} | "
        f"{fwd / n:.3g} | {1000 * med['decode'] / n:.3g} | {1000 * med['write'] / n:.2g} |"
    ]
