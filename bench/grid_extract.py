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
  open_clip bf16        the same under bf16 autocast, as open_clip_train's --precision amp_bf16
                        runs it (default: where the CPU has native bf16; --peer-precision)
  ours fp32             `CLIP.encode_grid(pixels)` under torch.no_grad (`extract_grids(fast=False)`)
  ours fast fp32        what extract_grids runs by default: `clip.inference.inference_tower`
                        (ResNets: BatchNorm folded into the convs, channels_last weights and
                        input), torch.inference_mode
  ours fast bf16        + bf16 autocast (`extract_grids(dtype="bfloat16")`, `--dtype bfloat16`):
                        only where the CPU has native bf16 (AVX512-BF16 / AMX, from
                        /proc/cpuinfo; --bf16 on forces it)
  open_clip +channels_last   (ResNets, --peer-fast) the same memory-format change on the peer
  open_clip ... (inference_mode)   (--peer-inference-mode) open_clip under torch.inference_mode,
                        the context of open_clip_train's evaluate and zero-shot code
"open_clip best" is the faster of the open_clip fp32 / bf16 rows; the CPU's features and the
load average are printed with the tables.
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
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from extract_e2e import bench_extract
from machine import cpu_features, keep_freed_memory, load_average, minor_faults, native_bf16_cpu
from open_clip_peer import (
    PEER_PRECISIONS,
    check_pos_embed,
    open_clip_at_size,
    open_clip_grid,
    open_clip_model,
    ours_from_open_clip,
    peer_autocast,
    peer_label,
    randomize_batchnorm_,
    ratio_columns,
)

from cliptransfer.clip import CLIP
from cliptransfer.clip.archs import get_arch
from cliptransfer.clip.grid import encode_grid
from cliptransfer.clip.inference import inference_tower
from cliptransfer.visual.extract import parse_size

DEFAULT_SIZES = {
    "RN50": "600x1000",
    "ViT-B-32": "384x640",
    "RN-tiny": "96x160",
    "ViT-tiny": "96x160",
}


@dataclass
class Variant:
    name: str
    run: Callable[[], torch.Tensor]  # one forward of the batch, returns (B, N, C) features
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per timed batch
    first: torch.Tensor | None = None


def make_variants(
    arch: str, args: argparse.Namespace, size: tuple[int, int], bf16: bool
) -> tuple[list[Variant], list[str], CLIP]:
    """The variants (open_clip ones first), the open_clip variants' names, our fp32 CLIP."""
    cfg = get_arch(arch)
    torch.manual_seed(args.seed)
    ref = open_clip_model(arch, cfg).eval()
    randomize_batchnorm_(ref, torch.Generator().manual_seed(args.seed))
    ours32 = ours_from_open_clip(arch, ref).eval()
    peer = open_clip_at_size(arch, cfg, ref, size)
    resnet = cfg.vision.kind == "resnet"
    if not resnet:
        check_pos_embed(arch, cfg, ref, peer, size)
    pixels = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    peer_grid = open_clip_grid(peer.visual)

    def open_clip_run(precision: str, inference: bool = False) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode() if inference else torch.no_grad(), peer_autocast(precision):
                return peer_grid(pixels)

        return run

    def ours_fp32() -> torch.Tensor:
        with torch.no_grad():  # extract_grids' context
            return ours32.encode_grid(pixels)[0]

    tower, channels_last = inference_tower(ours_from_open_clip(arch, ref).eval().visual)

    def ours_fast(bf16: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                # The conversion is part of the cost: a loader hands over contiguous NCHW batches.
                x = (
                    pixels.contiguous(memory_format=torch.channels_last)
                    if channels_last
                    else pixels
                )
                return encode_grid(tower, x)[0]

        return run

    peers = [Variant(peer_label(p), open_clip_run(p)) for p in args.peer_precision]
    if args.peer_inference_mode:  # the context open_clip_train's evaluate / zero_shot use
        peers += [
            Variant(f"{peer_label(p)} (inference_mode)", open_clip_run(p, inference=True))
            for p in args.peer_precision
        ]
    variants = peers + [Variant("ours fp32", ours_fp32)]
    if bf16:  # what extract_grids(dtype="bfloat16") runs
        variants.append(Variant("ours fast bf16", ours_fast(True)))
    variants.append(Variant("ours fast fp32", ours_fast(False)))  # extract_grids' default
    if resnet and args.peer_fast:
        peer_cl = open_clip_model(arch, cfg).eval()
        peer_cl.load_state_dict(ref.state_dict())
        peer_cl.visual.to(memory_format=torch.channels_last)
        peer_cl_grid = open_clip_grid(peer_cl.visual)

        def open_clip_cl() -> torch.Tensor:
            with torch.inference_mode():
                return peer_cl_grid(pixels.contiguous(memory_format=torch.channels_last))

        variants.append(Variant("open_clip +channels_last", open_clip_cl))
    return variants, [v.name for v in peers], ours32


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


def count(x: float) -> str:
    return f"{x / 1000:.0f}k" if x >= 10_000 else f"{x:.0f}"


def listing(times: list[float]) -> str:
    """Every timed batch, or the range when there are many."""
    if len(times) <= 7:
        return " ".join(f"{t:.3g}" for t in times)
    return f"{min(times):.3g} - {max(times):.3g} ({len(times)} batches)"


def bench_arch(arch: str, args: argparse.Namespace, bf16: bool, root: Path) -> tuple[list, list]:
    size = args.sizes.get(arch) or parse_size(DEFAULT_SIZES.get(arch, "448x448"))
    variants, peers, ours32 = make_variants(arch, args, size, bf16)
    load_before = load_average()
    run_interleaved(variants, args.warmup, args.repeats, args.budget)
    load = f"load average {load_before} before, {load_average()} after"
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
    medians = {v.name: statistics.median(v.times) for v in variants}
    best, cells = ratio_columns(medians, peers)
    fastest = min(min(v.times) for v in variants if v.name in peers)
    rows = []
    for v in variants:
        med = medians[v.name]
        rows.append(
            f"| {arch} | {size[0]}x{size[1]} | {v.name} | {med:.4g} | {args.batch / med:.3g} | "
            f"{cells[v.name]} | {fastest / min(v.times):.2f}x | "
            f"{count(statistics.median(v.faults) / args.batch)} | {listing(v.times)} |"
        )
    ours = "ours fast bf16" if bf16 else "ours fast fp32"
    dtype = "extract_grids(dtype='bfloat16')" if bf16 else "extract_grids()"
    print(
        f"[{arch}] ours ({dtype}) {args.batch / medians[ours]:.3g} images/s vs open_clip best "
        f"({best}) {args.batch / medians[best]:.3g}: {medians[best] / medians[ours]:.2f}x; {load}",
        flush=True,
    )
    extract_rows = [] if args.no_extract else bench_extract(arch, ours32, args, size, root, bf16)
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
        "--peer-precision",
        nargs="+",
        choices=PEER_PRECISIONS,
        default=None,
        help="open_clip under fp32 and/or bf16 autocast (amp_bf16) (default: fp32, plus amp_bf16 "
        "where ours uses bf16)",
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
    parser.add_argument(
        "--peer-inference-mode",
        action="store_true",
        help="also time open_clip under torch.inference_mode (as its evaluate/zero_shot run it) "
        "instead of no_grad",
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
    default_peers = ["fp32", "amp_bf16"] if bf16 else ["fp32"]
    args.peer_precision = list(dict.fromkeys(args.peer_precision or default_peers))
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), native bf16: {'yes' if native else 'no'}, "
        f"malloc: {args.malloc}\nCPU: {cpu_features()}\n"
        f"load average (1/5/15 min) at start: {load_average()}"
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
    names = [peer_label(p) for p in args.peer_precision]
    if args.peer_inference_mode:
        names += [f"{n} (inference_mode)" for n in names]
    peers = " | ".join(f"vs {n}" for n in names)
    print(
        f"\n| arch | input HxW | variant | median s/batch ({args.batch}) | images/s "
        f"| vs open_clip best | {peers} | (fastest batch vs open_clip's fastest) "
        "| page faults/image | timed batches (s) |\n" + "|---" * (9 + len(names)) + "|"
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

    print(f"\nCPU: {cpu_features()}\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
