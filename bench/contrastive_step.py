"""Train-step speed of cliptransfer's CLIP vs open_clip: same architecture, weights and batch.

One step = forward + CLIP loss + backward + AdamW step + logit-scale clamp. Both models are
built in this process, ours loaded from open_clip's state dict (the printed output differences
show it is the same computation), fed the same batch (random pixels; Shapes captions tokenized
as in training, or --text uniform), on the same threads. Steps are interleaved (A, B, C, then
C, B, A, ...) so machine-load drift hits every variant alike; warm-up steps are dropped and the
median of the timed steps is reported, with the load average and the CPU's features.

Variants:
  open_clip fp32   open_clip's training step (open_clip_train: ClipLoss, AdamW with its
                   gain/bias groups, torch's default single-tensor AdamW on CPU), --precision fp32
  open_clip bf16   the same under open_clip_train's own autocast for --precision amp_bf16
                   (default: where the CPU has native bf16; --peer-precision)
  ours fp32        cliptransfer ContrastiveModel(method="clip"), same optimizer settings
  ours fast fp32   `train.fast_kernels=true`: text padding after the batch's last EOT trimmed
                   (`trim_text_padding`), channels_last (ResNet towers), fused AdamW
  ours fast bf16   + bf16 autocast (`train.precision=bf16`): only where the CPU has native bf16
                   (AVX512-BF16 / AMX; --bf16 on forces it); torch.compile with --compile
"open_clip best" is the faster of the open_clip rows; "ours" is the fast row our trainer would
run here (bf16 where native). The FLOPs of one step of each variant are counted with
torch.utils.flop_counter and set against this machine's fp32 / bf16 GEMM rate.

    python bench/contrastive_step.py                       # RN50 and ViT-B-32, batch 16
    python bench/contrastive_step.py --arch RN50 --steps 5 --warmup 2 --ablate
    python bench/contrastive_step.py --quick               # tiny configs, < 1 minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import open_clip
import torch
from machine import (
    count_flops,
    cpu_features,
    fraction_line,
    gemm_rates,
    load_average,
    native_bf16_cpu,
)
from open_clip.loss import ClipLoss
from open_clip_peer import (
    PEER_PRECISIONS,
    open_clip_model,
    ours_from_open_clip,
    peer_autocast,
    peer_label,
    ratio_columns,
)
from step_parts import BETAS, EPS, LR, WD, bench_components, make_batch

from cliptransfer.clip import CLIP
from cliptransfer.clip.archs import get_arch
from cliptransfer.contrastive.losses.clip import clamp_logit_scale_
from cliptransfer.contrastive.objectives import ContrastiveModel, LossConfig
from cliptransfer.engine.optim import param_groups


@torch.no_grad()
def max_output_diff(
    ours: CLIP, ref: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor
) -> tuple[float, float, float]:
    """Max |ours - open_clip| of image and text embeddings (eval mode), and max |embedding|."""
    ours.eval(), ref.eval()
    img, ref_img = ours.encode_image(pixels), ref.encode_image(pixels)
    txt, ref_txt = ours.encode_text(ids), ref.encode_text(ids)
    ours.train(), ref.train()
    scale = max(ref_img.abs().max().item(), ref_txt.abs().max().item())
    return (img - ref_img).abs().max().item(), (txt - ref_txt).abs().max().item(), scale


@dataclass
class Variant:
    name: str
    step: Callable[[], float] | None  # runs one train step, returns the loss
    times: list[float] = field(default_factory=list)
    first_loss: float = math.nan
    flops: int = 0  # FLOPs of one step (counted in the first warm-up step)


def open_clip_variant(
    model: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor, precision: str
) -> Variant:
    """open_clip_train's step on CPU at `--precision` (fp32 or amp_bf16: its own autocast around
    forward + loss, fp32 weights and inputs; its "amp" fp16 default is CUDA-oriented)."""
    model.train()
    loss_fn = ClipLoss()

    def exclude(n: str, p: torch.Tensor) -> bool:  # open_clip_train's no-weight-decay rule
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)

    def step() -> float:
        opt.zero_grad()
        with peer_autocast(precision):
            img, txt, scale = model(pixels, ids)  # normalized (B, D), (B, D); exp(logit_scale)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    return Variant(peer_label(precision), step)


def ours_variant(
    name: str,
    clip: CLIP,
    pixels: torch.Tensor,
    ids: torch.Tensor,
    *,
    channels_last: bool = False,
    trim_text: bool = False,
    fused_adamw: bool = False,
    bf16: bool = False,
    compile: bool = False,
) -> Variant:
    model = ContrastiveModel(clip, LossConfig(method="clip")).train()
    if channels_last:
        clip.visual.to(memory_format=torch.channels_last)
    clip.trim_text_padding = trim_text
    opt = torch.optim.AdamW(
        param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, fused=True if fused_adamw else None
    )
    forward = torch.compile(model) if compile else model

    def step() -> float:
        opt.zero_grad()
        # The conversion belongs to the step: a loader would hand over contiguous NCHW batches.
        image = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
        # What Accelerate's autocast() runs on CPU for train.precision=bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward({"image": image, "text": ids})["loss"]
        loss.backward()
        opt.step()
        clamp_logit_scale_(clip.logit_scale, 100.0)
        return loss.item()

    return Variant(name, step)


def run_interleaved(variants: list[Variant], warmup: int, steps: int, flops: bool) -> None:
    """Rounds of one step per variant, the order reversed every round; warm-up rounds dropped.
    With `flops`, the first (warm-up) step of each variant runs under FlopCounterMode."""
    for i in range(warmup + steps):
        for v in variants if i % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            if i == 0 and flops:
                loss, v.flops = count_flops(v.step)
            else:
                loss = v.step()
            elapsed = time.perf_counter() - start
            if i == 0:
                v.first_loss = loss  # every variant starts from the same weights
            if i >= warmup:
                v.times.append(elapsed)
            # Progress on stderr: a full-size step takes seconds, a run minutes.
            tag = "warm-up" if i < warmup else "timed"
            print(f"  {tag} {v.name}: {elapsed:.2f} s", file=sys.stderr, flush=True)


@dataclass
class Result:
    arch: str
    variants: list[Variant]
    peers: list[str]  # names of the open_clip variants
    ours: str  # name of the variant our trainer runs on this machine
    load: str


def bench_arch(arch: str, args: argparse.Namespace, bf16: bool) -> Result:
    """Times every variant of one architecture; prints the equivalence checks as it goes."""
    cfg = get_arch(arch)
    torch.manual_seed(args.seed)
    ref = open_clip_model(arch, cfg)
    peer_models = [ref] + [copy.deepcopy(ref) for _ in args.peer_precision[1:]]
    ours32 = ours_from_open_clip(arch, ref)
    ours_fast = ours_from_open_clip(arch, ref)
    pixels, ids = make_batch(cfg, args.batch, args.seed, args.text)
    used = ids.argmax(dim=-1) + 1  # tokens up to and including the EOT
    print(
        f"[{arch}] texts ({args.text}): {used.float().mean():.1f} tokens on average, longest "
        f"{int(used.max())}, padded to {ids.shape[1]}",
        flush=True,
    )
    resnet = cfg.vision.kind == "resnet"
    fast = dict(channels_last=resnet, trim_text=True, fused_adamw=True)
    peers = [open_clip_variant(m, pixels, ids, p) for m, p in zip(peer_models, args.peer_precision)]
    ours = "ours fast bf16" if bf16 else "ours fast fp32"  # what train.* would run here
    variants = peers + [
        ours_variant("ours fp32", ours32, pixels, ids),
        ours_variant(ours, ours_fast, pixels, ids, **fast, bf16=bf16, compile=args.compile),
    ]
    if bf16:  # the same fast path without bf16, to show what bf16 itself gives
        model = ours_from_open_clip(arch, ref)
        variants.append(ours_variant("ours fast fp32", model, pixels, ids, **fast))
    n = min(4, args.batch)
    for name, model in (("ours fp32", ours32), ("ours fast", ours_fast)):
        d_img, d_txt, scale = max_output_diff(model, ref, pixels[:n], ids[:n])
        print(
            f"[{arch}] {name} (open_clip's weights) vs open_clip, eval outputs: max |diff| image "
            f"emb {d_img:.2e}, text emb {d_txt:.2e} (max |emb| {scale:.2f})",
            flush=True,
        )
    if args.ablate:
        single = [("ours +trim text padding", dict(trim_text=True))]
        single.append(("ours +fused AdamW", dict(fused_adamw=True)))
        if resnet:
            single.append(("ours +channels_last", dict(channels_last=True)))
        for name, kw in single:
            variants.append(ours_variant(name, ours_from_open_clip(arch, ref), pixels, ids, **kw))
    load_before = load_average()
    run_interleaved(variants, args.warmup, args.steps, flops=not args.compile)
    load = f"load average {load_before} before, {load_average()} after"
    fp32 = next(v for v in variants if v.name == "ours fp32")
    print(
        f"[{arch}] first-step loss: "
        + ", ".join(f"{v.name} {v.first_loss:.6f}" for v in variants)
        + f" (max |diff| fp32 {abs(fp32.first_loss - peers[0].first_loss):.1e})",
        flush=True,
    )
    for v in variants:  # keep the timings, free the models and optimizer states
        v.step = None
    return Result(arch, variants, [v.name for v in peers], ours, load)


def report(
    res: Result, args: argparse.Namespace, bf16: bool, rates: dict[str, float]
) -> tuple[list[str], list[str]]:
    """Markdown table rows for one architecture, and summary lines (our setting vs open_clip
    best, FLOP fractions of this machine's GEMM rates)."""
    arch, variants = res.arch, res.variants
    medians = {v.name: statistics.median(v.times) for v in variants}
    best, cells = ratio_columns(medians, res.peers)
    fastest = min(min(v.times) for v in variants if v.name in res.peers)
    rows = []
    for v in variants:
        med = medians[v.name]
        frac = [f"{100 * v.flops / med / 1e9 / rates[k]:.0f}%" for k in ("bf16", "fp32")]
        # The fastest step is the least disturbed by other processes: a second opinion.
        rows.append(
            f"| {arch} | {v.name} | {med:.3f} | {args.batch / med:.2f} | {cells[v.name]} | "
            f"{fastest / min(v.times):.2f}x | {v.flops / 1e9:.1f} | {frac[0]} | {frac[1]} | "
            f"{' '.join(f'{t:.3g}' for t in v.times)} |"
        )
    ours = res.ours
    setting = "train.fast_kernels=true" + (" train.precision=bf16" if bf16 else "")
    summary = [
        f"[{arch}] ours ({setting}) {args.batch / medians[ours]:.2f} samples/s vs open_clip best "
        f"({best}) {args.batch / medians[best]:.2f}: {medians[best] / medians[ours]:.2f}x; "
        f"{res.load}"
    ]
    if not args.compile:
        summary += [
            f"[{arch}] " + fraction_line(v.name, v.flops, medians[v.name], rates)
            for v in variants
            if v.name in (ours, best)
        ]
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=None, help="default: RN50 ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
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
        help="open_clip_train --precision values to time (default: fp32, plus amp_bf16 where "
        "ours uses bf16)",
    )
    parser.add_argument(
        "--text",
        choices=("captions", "uniform"),
        default="captions",
        help="captions: Shapes captions tokenized as in training (padded to the context); "
        "uniform: random lengths up to the context (worst case for padding trimming)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile 'ours fast'")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also time each 'fast' change alone (one more model + AdamW state each: ~2 GB at "
        "RN50/ViT-B-32 size)",
    )
    parser.add_argument(
        "--components",
        action="store_true",
        help="instead: time the parts each 'fast' change touches, alone (less noisy)",
    )
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n GEMM probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny RN/ViT configs, 5 timed steps, 1 thread unless --threads: a smoke run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.arch = args.arch or ["RN-tiny", "ViT-tiny"]
        args.steps = max(args.steps, 5)
        # Tiny ops are dominated by OpenMP barriers, which stall when other processes share
        # the cores: one thread keeps the smoke run fast and stable.
        args.threads = args.threads or 1
    args.arch = args.arch or ["RN50", "ViT-B-32"]
    if args.steps < 1 or args.warmup < 1 or args.batch < 1:
        parser.error("--steps, --warmup and --batch must be >= 1 (warm-up includes compile)")
    if args.threads:
        torch.set_num_threads(args.threads)
    native = native_bf16_cpu()
    bf16 = {"auto": native, "on": True, "off": False}[args.bf16]
    default_peers = ["fp32", "amp_bf16"] if bf16 else ["fp32"]
    args.peer_precision = list(dict.fromkeys(args.peer_precision or default_peers))
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), native bf16: {'yes' if native else 'no'}\n"
        f"CPU: {cpu_features()}\nload average (1/5/15 min) at start: {load_average()}"
    )
    if not bf16:
        print(
            "ours fast: fp32 (no native bf16 on this CPU: bf16 autocast would be emulated and "
            "usually slower; --bf16 on forces it)"
        )
    print(f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, interleaved\n")
    rows = []
    if args.components:
        for arch in args.arch:
            rows += bench_components(arch, args)
        print(
            f"| arch | part (B = {args.batch}) | default (median s) | fast (median s) | saved s "
            "| speed-up |\n|---|---|---|---|---|---|"
        )
        print("\n".join(rows))
        return
    rates = gemm_rates(args.gemm_size)
    results = []
    for arch in args.arch:
        results.append(bench_arch(arch, args, bf16))
        gc.collect()  # one architecture's models in memory at a time (~10 GB at ViT-B-32)
    after = gemm_rates(args.gemm_size)  # the best of both: the least disturbed by other jobs
    rates = {k: max(rates[k], after[k]) for k in rates}
    summary = []
    for res in results:
        r, s = report(res, args, bf16, rates)
        rows, summary = rows + r, summary + s
    peers = " | ".join(f"vs {peer_label(p)}" for p in args.peer_precision)
    print(
        f"\n| arch | variant | median s/step | samples/s | vs open_clip best | {peers} "
        "| (fastest step vs open_clip's fastest) | GFLOP/step | % of bf16 GEMM rate "
        "| % of fp32 GEMM rate | timed steps (s) |\n"
        + "|---" * (10 + len(args.peer_precision))
        + "|"
    )
    print("\n".join(rows))
    print(
        f"\nGEMM rate, {args.gemm_size}x{args.gemm_size} matmul on {torch.get_num_threads()} "
        f"thread(s) (best of the runs before and after): bf16 {rates['bf16']:.0f} GFLOP/s, fp32 "
        f"{rates['fp32']:.0f} GFLOP/s"
    )
    print("\n".join(summary))
    print(f"CPU: {cpu_features()}\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
