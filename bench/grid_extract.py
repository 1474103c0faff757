"""Grid-feature extraction speed of cliptransfer vs open_clip: same backbone, weights and input.

Grid features are what `cliptransfer.visual.extract.extract_grids` stores: for ResNets the
`layer4` output before the attention pool (CLIP-ViL), for ViTs the patch tokens after the final
LayerNorm with the position embedding resampled (bicubic, no antialias) to the input's grid.
open_clip's model is built with a fixed seed (random weights, BatchNorm statistics randomised so
every residual branch matters) and ours is loaded from its state dict, so both compute the same
function; the printed max |diff| of the features shows it. open_clip's side uses its own feature
API, `visual.forward_intermediates(..., intermediates_only=True)`: ModifiedResNet stem +
layer1..4, VisionTransformer blocks + `ln_post` (`normalize_intermediates=True`); a ViT at a
non-native size is built with `force_image_size` and loaded with open_clip's `resize_pos_embed`
(antialias=False, as ours; open_clip's default antialias=True is a different kernel, printed).

Variants, each timed on the same preprocessed pixel batch (forward pass only):
  open_clip fp32        open_clip's visual tower as above, torch.no_grad
  ours fp32             `CLIP.encode_grid(pixels)` under torch.no_grad (`extract_grids(fast=False)`)
  ours fast             what extract_grids runs by default: `models.inference.inference_tower`
                        (ResNets: BatchNorm folded into the convs, channels_last weights and
                        input), torch.inference_mode, bf16 autocast only where the CPU has native
                        bf16 (AVX512-BF16 / AMX, from /proc/cpuinfo; --bf16 on forces it).
  open_clip +channels_last   (ResNets, --peer-fast) the same memory-format change on the peer
Rounds of one batch per variant, order reversed every round, warm-up dropped, median reported,
with the minor page faults per image: at these input sizes most activations are 32 MiB or more,
which glibc serves as fresh mmaps that the kernel zero-fills page by page on every forward.
`--malloc keep` makes glibc keep and reuse freed memory instead (a process-wide setting: it
speeds up both sides alike).

Then (unless --no-extract) the whole `extract_grids` on a folder of generated JPEGs into a fresh
FeatureStore, against the forward pass alone, with its parts timed separately (decode + resize +
normalise, the state-dict hash and the batch-1 probe forward done once per call, store writes).

    python bench/grid_extract.py                 # RN50 600x1000 + ViT-B-32 384x640, batch 2
    python bench/grid_extract.py --arch RN50 --size RN50=448x448 --batch 4 --repeats 5
    python bench/grid_extract.py --arch RN50 --peer-fast --no-extract --malloc keep
    python bench/grid_extract.py --quick         # RN-tiny + ViT-tiny 96x160, < 1 minute
"""

from __future__ import annotations

import argparse
import ctypes
import math
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip_peer import native_bf16_cpu, open_clip_model, ours_from_open_clip
from PIL import Image

from cliptransfer.clip import CLIP
from cliptransfer.clip.archs import CLIPConfig, get_arch
from cliptransfer.clip.grid import encode_grid, resample_pos_embed
from cliptransfer.clip.inference import inference_tower
from cliptransfer.contrastive.pairs import open_image
from cliptransfer.visual.extract import extract_grids, load_backbone, parse_size, preprocess
from cliptransfer.visual.store import FeatureStore

DEFAULT_SIZES = {
    "RN50": "600x1000",
    "ViT-B-32": "384x640",
    "RN-tiny": "96x160",
    "ViT-tiny": "96x160",
}


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never give freed memory back to the OS
    (mallopt M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = -1, i.e. SIZE_MAX: the same as running with
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615). By default blocks of 32 MiB
    and more (most activations at these input sizes) are fresh mmaps, zero-filled page by page
    by the kernel on every forward. Call before any large allocation. False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, -1))
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def randomize_batchnorm_(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics.

    open_clip zero-initialises every bottleneck's last BN scale (bn3), so a freshly built
    ModifiedResNet's residual branches output exactly zero and an equality check would only see
    the shortcut path. Speed is unaffected (the same kernels run either way)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def open_clip_at_size(
    arch: str, cfg: CLIPConfig, ref: torch.nn.Module, size: tuple[int, int]
) -> torch.nn.Module:
    """`ref` for a `size` input. ResNets run at any size up to layer4 (only the attention pool,
    unused here, is tied to 224). ViTs: open_clip's usual route, a model built for the size
    (`force_image_size`) loaded through `resize_pos_embed`, with antialias=False like ours."""
    native = cfg.vision.image_size
    if cfg.vision.kind == "resnet" or size == (native, native):
        return ref
    model = open_clip_model(arch, cfg, image_size=size)
    sd = ref.state_dict()
    open_clip.model.resize_pos_embed(sd, model, interpolation="bicubic", antialias=False)
    model.load_state_dict(sd)
    return model.eval()


def open_clip_grid(visual: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) -> (B, H'*W', C) grid features with open_clip's `forward_intermediates`."""
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):

        def resnet(pixels: torch.Tensor) -> torch.Tensor:
            out = visual.forward_intermediates(pixels, indices=[4], intermediates_only=True)
            return out["image_intermediates"][0].flatten(2).transpose(1, 2)  # layer4

        return resnet

    def vit(pixels: torch.Tensor) -> torch.Tensor:
        out = visual.forward_intermediates(
            pixels,
            indices=1,  # the last block
            normalize_intermediates=True,  # ln_post
            intermediates_only=True,
            output_fmt="NLC",  # class token already split off
        )
        return out["image_intermediates"][0]

    return vit


@dataclass
class Variant:
    name: str
    run: Callable[[], torch.Tensor]  # one forward of the batch, returns (B, N, C) features
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per timed batch
    first: torch.Tensor | None = None


def make_variants(
    arch: str, args: argparse.Namespace, size: tuple[int, int], bf16: bool
) -> tuple[list[Variant], CLIP]:
    cfg = get_arch(arch)
    torch.manual_seed(args.seed)
    ref = open_clip_model(arch, cfg).eval()
    randomize_batchnorm_(ref, torch.Generator().manual_seed(args.seed))
    ours32 = ours_from_open_clip(arch, ref).eval()
    ours_fast = ours_from_open_clip(arch, ref).eval()
    peer = open_clip_at_size(arch, cfg, ref, size)
    resnet = cfg.vision.kind == "resnet"
    if not resnet:
        check_pos_embed(arch, cfg, ref, peer, size)
    pixels = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    peer_grid = open_clip_grid(peer.visual)

    def open_clip_fp32() -> torch.Tensor:
        with torch.no_grad():
            return peer_grid(pixels)

    def ours_fp32() -> torch.Tensor:
        with torch.no_grad():  # extract_grids' context
            return ours32.encode_grid(pixels)[0]

    tower, channels_last = inference_tower(ours_fast.visual)

    def ours_fast_run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            # The conversion is part of the cost: a loader hands over contiguous NCHW batches.
            x = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
            return encode_grid(tower, x)[0]

    variants = [
        Variant("open_clip fp32", open_clip_fp32),
        Variant("ours fp32", ours_fp32),
        Variant("ours fast" + (" (bf16)" if bf16 else ""), ours_fast_run),
    ]
    if resnet and args.peer_fast:
        peer_cl = open_clip_model(arch, cfg).eval()
        peer_cl.load_state_dict(ref.state_dict())
        peer_cl.visual.to(memory_format=torch.channels_last)
        peer_cl_grid = open_clip_grid(peer_cl.visual)

        def open_clip_cl() -> torch.Tensor:
            with torch.inference_mode():
                return peer_cl_grid(pixels.contiguous(memory_format=torch.channels_last))

        variants.append(Variant("open_clip +channels_last", open_clip_cl))
    return variants, ours32


def check_pos_embed(
    arch: str, cfg: CLIPConfig, ref: torch.nn.Module, peer: torch.nn.Module, size: tuple[int, int]
) -> None:
    """Our resampled ViT position embedding vs open_clip's resize_pos_embed (both antialias
    False), and how far open_clip's default (antialias=True: PIL's a=-0.5 cubic) is from it."""
    p = cfg.vision.patch_size
    grid_hw = (size[0] // p, size[1] // p)
    old = cfg.vision.image_size // p
    pos = ref.visual.positional_embedding.detach()
    ours = resample_pos_embed(pos[None], grid_hw, (old, old))[0]
    diff = (ours - peer.visual.positional_embedding.detach()).abs().max().item()
    sd = {"visual.positional_embedding": pos.clone()}
    open_clip.model.resize_pos_embed(sd, peer)  # defaults: bicubic, antialias=True
    aa = (ours - sd["visual.positional_embedding"]).abs().max().item()
    print(
        f"[{arch}] position embedding {old}x{old} -> {grid_hw[0]}x{grid_hw[1]}: ours vs open_clip "
        f"resize_pos_embed(antialias=False) max |diff| {diff:.1e}; vs its default antialias=True "
        f"{aa:.1e} (max |pos| {pos.abs().max().item():.2f})",
        flush=True,
    )


def run_interleaved(
    variants: list[Variant], warmup: int, repeats: int | None, budget: float
) -> None:
    """Rounds of one batch per variant, the order reversed every round; warm-up rounds dropped.
    `repeats` None: as many timed rounds as fit in `budget` seconds at the last warm-up round's
    pace, 3 to 15."""
    i = 0
    while repeats is None or i < warmup + repeats:
        round_s = 0.0
        for v in variants if i % 2 == 0 else variants[::-1]:
            faults, start = minor_faults(), time.perf_counter()
            out = v.run()
            elapsed, faults = time.perf_counter() - start, minor_faults() - faults
            round_s += elapsed
            if v.first is None:
                v.first = out.float()
            if i >= warmup:
                v.times.append(elapsed)
                v.faults.append(faults)
            tag = "warm-up" if i < warmup else "timed"
            print(f"  {tag} {v.name}: {elapsed:.2f} s", file=sys.stderr, flush=True)
        i += 1
        if repeats is None and i == warmup:
            repeats = min(15, max(3, math.ceil(budget / round_s)))
            print(f"  {repeats} timed rounds ({round_s:.1f} s each)", file=sys.stderr, flush=True)


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
    arch: str, ours: CLIP, args: argparse.Namespace, size: tuple[int, int], root: Path
) -> list[str]:
    """extract_grids end to end vs the forward pass alone on the same images, interleaved."""
    n = args.extract_images
    folder = root / f"{arch}-jpeg"
    folder.mkdir()
    files = write_jpegs(folder, n, args.jpeg_size, args.seed)
    mb = sum(f.stat().st_size for f in files) / 2**20
    times: dict[str, list[float]] = {"forward": [], "extract": []}
    parts: dict[str, list[float]] = {"decode": [], "hash": [], "probe": [], "write": []}

    def forward(pixels: torch.Tensor) -> None:
        # The same model and batching as extract_grids, on already preprocessed pixels.
        with torch.no_grad():
            for s in range(0, n, args.batch):
                ours.encode_grid(pixels[s : s + args.batch])

    def extract(out: Path) -> None:
        stats = extract_grids(ours, folder, out, size=size, batch_size=args.batch)
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
        with torch.no_grad():
            probe, _ = ours.encode_grid(torch.zeros(1, 3, *size))  # its grid-size probe
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
        f"{mb:.1f} MB) at {size[0]}x{size[1]}, batch {args.batch}: forward alone {fwd:.2f} s, "
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


def count(x: float) -> str:
    return f"{x / 1000:.0f}k" if x >= 10_000 else f"{x:.0f}"


def listing(times: list[float]) -> str:
    """Every timed batch, or the range when there are many."""
    if len(times) <= 7:
        return " ".join(f"{t:.3g}" for t in times)
    return f"{min(times):.3g} - {max(times):.3g} ({len(times)} batches)"


def bench_arch(arch: str, args: argparse.Namespace, bf16: bool, root: Path) -> tuple[list, list]:
    size = args.sizes.get(arch) or parse_size(DEFAULT_SIZES.get(arch, "448x448"))
    variants, ours32 = make_variants(arch, args, size, bf16)
    run_interleaved(variants, args.warmup, args.repeats, args.budget)
    base = variants[0]
    grid_n, channels = base.first.shape[1:]
    scale = base.first.abs().max().item()
    for v in variants[1:]:
        diff = (v.first - base.first).abs().max().item()
        print(
            f"[{arch}] {v.name} vs open_clip fp32 at {size[0]}x{size[1]}: grid {grid_n} x "
            f"{channels}, max |diff| {diff:.1e} (max |feature| {scale:.2f}, relative "
            f"{diff / scale:.1e})",
            flush=True,
        )
    base_med, base_min = statistics.median(base.times), min(base.times)
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        rows.append(
            f"| {arch} | {size[0]}x{size[1]} | {v.name} | {med:.4g} | {args.batch / med:.3g} | "
            f"**{base_med / med:.2f}x** | {base_min / min(v.times):.2f}x | "
            f"{count(statistics.median(v.faults) / args.batch)} | {listing(v.times)} |"
        )
    extract_rows = [] if args.no_extract else bench_extract(arch, ours32, args, size, root)
    return rows, extract_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=None, help="default: RN50 ViT-B-32")
    parser.add_argument(
        "--size",
        nargs="+",
        default=[],
        help="input size HxW for every arch, or ARCH=HxW entries (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SIZES.items())
        + ")",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed batches per variant (default: as many rounds as fit in --budget, 3 to 15)",
    )
    parser.add_argument(
        "--budget", type=float, default=40.0, help="seconds of timed rounds per arch (default)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast in 'ours fast' (auto: only with native bf16)",
    )
    parser.add_argument(
        "--peer-fast",
        action="store_true",
        help="also time open_clip's ResNet with channels_last + inference_mode",
    )
    parser.add_argument(
        "--malloc",
        choices=("system", "keep"),
        default="system",
        help="keep: glibc keeps freed memory for reuse instead of unmapping it (both sides alike; "
        "see keep_freed_memory)",
    )
    parser.add_argument("--no-extract", action="store_true", help="skip the extract_grids part")
    parser.add_argument("--extract-images", type=int, default=None, help="default: 2 x batch")
    parser.add_argument("--extract-repeats", type=int, default=2)
    parser.add_argument("--jpeg-size", default="480x640", help="generated JPEGs, HxW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="RN-tiny + ViT-tiny at 96x160, batch 8, 32 JPEGs: a smoke run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.arch = args.arch or ["RN-tiny", "ViT-tiny"]
        args.batch = 8 if args.batch == 2 else args.batch
        args.budget = min(args.budget, 5.0)  # tiny batches take ~20 ms: 15 rounds
        args.extract_images = args.extract_images or 32
        args.jpeg_size = "240x320" if args.jpeg_size == "480x640" else args.jpeg_size
    args.arch = args.arch or ["RN50", "ViT-B-32"]
    args.extract_images = args.extract_images or 2 * args.batch
    args.jpeg_size = parse_size(args.jpeg_size)
    timed = 1 if args.repeats is None else args.repeats
    if min(timed, args.warmup, args.batch, args.extract_repeats) < 1:
        parser.error("--repeats, --warmup, --batch and --extract-repeats must be >= 1")
    args.sizes = {}
    for s in args.size:
        arch, _, hw = s.rpartition("=")
        for a in [arch] if arch else args.arch:
            args.sizes[a] = parse_size(hw)
    if args.malloc == "keep" and not keep_freed_memory():
        parser.error("--malloc keep needs glibc's mallopt")
    torch.set_num_threads(args.threads)
    native = native_bf16_cpu()
    bf16 = {"auto": native, "on": True, "off": False}[args.bf16]
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.machine()} "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, native bf16: {'yes' if native else 'no'}, "
        f"malloc: {args.malloc}"
    )
    if not bf16:
        print(
            "ours fast: fp32 (no native bf16 on this CPU: bf16 autocast would be emulated and "
            "slower; --bf16 on forces it)"
        )
    print(
        f"batch {args.batch}, {args.warmup} warm-up + "
        f"{args.repeats or f'up to {args.budget:.0f} s of'} timed batches per variant, "
        "interleaved\n",
        flush=True,
    )
    rows, extract_rows = [], []
    root = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    try:
        for arch in args.arch:
            r, e = bench_arch(arch, args, bf16, root)
            rows += r
            extract_rows += e
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\n| arch | input HxW | variant | median s/batch ({args.batch}) | images/s "
        "| vs open_clip fp32 (median) | (fastest batch) | page faults/image | timed batches (s) |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    if extract_rows:
        print(
            "\n| arch | input HxW | images | forward only, images/s | extract_grids, images/s "
            "| extract / forward | per call: state sha256 s | per call: batch-1 probe s "
            "| per image: forward s | per image: decode+resize ms | per image: store write ms |"
            "\n|---|---|---|---|---|---|---|---|---|---|---|"
        )
        print("\n".join(extract_rows))


if __name__ == "__main__":
    main()
