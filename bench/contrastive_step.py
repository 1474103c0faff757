"""Train-step speed of cliptransfer's CLIP vs open_clip: same architecture, weights and batch.

One step = forward + CLIP loss + backward + AdamW step + logit-scale clamp. Both models are
built in this process, ours loaded from open_clip's state dict (the printed output differences
show it is the same computation), fed the same batch (random pixels; Shapes captions tokenized
as in training, or --text uniform), on the same threads. Steps are interleaved (A, B, C, then
C, B, A, ...) so machine-load drift hits every variant alike; warm-up steps are dropped and the
median of the timed steps is reported.

Variants:
  open_clip fp32   open_clip's default training step (open_clip_train: fp32 on CPU, ClipLoss,
                   AdamW with its gain/bias groups, torch's default single-tensor AdamW on CPU)
  ours fp32        cliptransfer ContrastiveModel(method="clip"), same optimizer settings
  ours fast        + text padding after the batch's last EOT trimmed (`trim_text_padding`),
                   channels_last (ResNet towers), fused AdamW, bf16 autocast only where the CPU
                   has native bf16 (AVX512-BF16 / AMX), torch.compile with --compile

    python bench/contrastive_step.py                       # RN50 and ViT-B-32, batch 16
    python bench/contrastive_step.py --arch RN50 --steps 5 --warmup 2 --ablate
    python bench/contrastive_step.py --quick               # tiny configs, < 30 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip_peer import native_bf16_cpu, open_clip_model, ours_from_open_clip

from cliptransfer.clip import CLIP, create_clip
from cliptransfer.clip.archs import CLIPConfig, get_arch
from cliptransfer.contrastive.losses.clip import clamp_logit_scale_
from cliptransfer.contrastive.objectives import ContrastiveModel, LossConfig
from cliptransfer.defaults import resolve_tokenizer
from cliptransfer.engine.optim import param_groups
from cliptransfer.worlds.shapes.captions import make_captions
from cliptransfer.worlds.shapes.scene import sample_scene

# open_clip_train's defaults for ViT/RN CLIP (lr is irrelevant to speed but kept realistic).
LR, BETAS, EPS, WD = 5e-4, (0.9, 0.98), 1e-6, 0.2
OPENAI_VOCAB = 49408


def caption_ids(cfg: CLIPConfig, batch: int, seed: int) -> torch.Tensor:
    """(B, L) ids of Shapes-world captions (one per scene), tokenized as in training: OpenAI's
    BPE padded to the context length (open_clip.tokenize) for OpenAI-vocabulary models, the
    packaged Shapes tokenizer for the tiny ones. Both put the EOT at the largest id."""
    captions = []
    for i in range(batch):
        rng = random.Random(seed * 1_000_003 + i)
        captions.append(rng.choice(make_captions(sample_scene(rng), rng)))
    length, vocab = cfg.text.context_length, cfg.text.vocab_size
    if vocab == OPENAI_VOCAB:
        return open_clip.tokenize(captions, context_length=length)
    tokenizer = resolve_tokenizer("shapes", context_length=length)
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"--text captions: the Shapes tokenizer has {tokenizer.vocab_size} ids, more than "
            f"the model's vocab_size {vocab}; use --text uniform"
        )
    return tokenizer(captions)


def uniform_ids(cfg: CLIPConfig, batch: int, g: torch.Generator) -> torch.Tensor:
    """(B, L) random ids, EOT (the largest id) at a uniform position in [L/4, L), zero padding
    after it: the batch's longest text is close to L, so trimming padding saves ~nothing."""
    length, vocab = cfg.text.context_length, cfg.text.vocab_size
    ids = torch.randint(1, vocab - 1, (batch, length), generator=g)
    eot = torch.randint(length // 4, length, (batch,), generator=g)
    ids = torch.where(torch.arange(length)[None] < eot[:, None], ids, 0)
    ids[torch.arange(batch), eot] = vocab - 1
    return ids


def make_batch(
    cfg: CLIPConfig, batch: int, seed: int, text: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels (B, 3, S, S) and token ids (B, L) (see `caption_ids`, `uniform_ids`)."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids = caption_ids(cfg, batch, seed) if text == "captions" else uniform_ids(cfg, batch, g)
    return pixels, ids


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
    step: Callable[[], float]  # runs one train step, returns the loss
    times: list[float] = field(default_factory=list)
    first_loss: float = math.nan


def open_clip_variant(model: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor) -> Variant:
    """open_clip_train's step on CPU (precision fp32; its "amp" default is CUDA-oriented)."""
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
        img, txt, scale = model(pixels, ids)  # normalized (B, D), (B, D); exp(logit_scale)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    return Variant("open_clip fp32", step)


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
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = forward({"image": image, "text": ids})["loss"]
        loss.backward()
        opt.step()
        clamp_logit_scale_(clip.logit_scale, 100.0)
        return loss.item()

    return Variant(name, step)


def run_interleaved(variants: list[Variant], warmup: int, steps: int) -> None:
    """Rounds of one step per variant, the order reversed every round; warm-up rounds dropped."""
    for i in range(warmup + steps):
        for v in variants if i % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            loss = v.step()
            elapsed = time.perf_counter() - start
            if i == 0:
                v.first_loss = loss  # every variant starts from the same weights
            if i >= warmup:
                v.times.append(elapsed)
            # Progress on stderr: a full-size step takes seconds, a run minutes.
            tag = "warm-up" if i < warmup else "timed"
            print(f"  {tag} {v.name}: {elapsed:.2f} s", file=sys.stderr, flush=True)


def bench_arch(arch: str, args: argparse.Namespace, bf16: bool) -> list[str]:
    """Markdown table rows for one architecture; prints the equivalence checks as it goes."""
    cfg = get_arch(arch)
    torch.manual_seed(args.seed)
    ref = open_clip_model(arch, cfg)
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
    fast = dict(channels_last=resnet, trim_text=True, fused_adamw=True, bf16=bf16)
    variants = [
        open_clip_variant(ref, pixels, ids),
        ours_variant("ours fp32", ours32, pixels, ids),
        ours_variant("ours fast", ours_fast, pixels, ids, **fast, compile=args.compile),
    ]
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
    run_interleaved(variants, args.warmup, args.steps)
    base = variants[0]
    print(
        f"[{arch}] first-step loss: "
        + ", ".join(f"{v.name} {v.first_loss:.6f}" for v in variants)
        + f" (max |diff| fp32 {abs(variants[1].first_loss - base.first_loss):.1e})",
        flush=True,
    )
    base_med, base_min = statistics.median(base.times), min(base.times)
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        # The fastest step is the least disturbed by other processes: a second opinion.
        rows.append(
            f"| {arch} | {v.name} | {med:.3f} | {args.batch / med:.2f} | "
            f"**{base_med / med:.2f}x** | {base_min / min(v.times):.2f}x | "
            f"{' '.join(f'{t:.2f}' for t in v.times)} |"
        )
    return rows


def bench_components(arch: str, args: argparse.Namespace) -> list[str]:
    """Table rows timing, alone, each part a "fast" change touches: text tower forward +
    backward (padded vs trimmed), image tower forward + backward (NCHW vs channels_last,
    ResNets), AdamW step (single-tensor loop vs fused). Interleaved, median of --steps."""
    cfg = get_arch(arch)
    torch.manual_seed(args.seed)
    clip = create_clip(arch).train()
    pixels, ids = make_batch(cfg, args.batch, args.seed, args.text)

    def text(trim: bool) -> Callable[[], None]:
        def run() -> None:
            clip.trim_text_padding = trim
            clip.encode_text(ids).sum().backward()

        return run

    def image(visual: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
        return lambda: visual(x).sum().backward()

    def adamw(fused: bool) -> Callable[[], None]:
        params = [torch.nn.Parameter(p.detach().clone()) for p in clip.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, fused=fused or None).step

    longest = int(ids.argmax(dim=-1).max()) + 1
    padded, trimmed = f"padded to {ids.shape[1]}", f"trimmed to {longest}"
    parts = [("text tower fwd+bwd", padded, trimmed, text(False), text(True))]
    if cfg.vision.kind == "resnet":
        visual_cl = copy.deepcopy(clip.visual).to(memory_format=torch.channels_last)
        pixels_cl = pixels.contiguous(memory_format=torch.channels_last)
        parts.append(
            (
                "image tower fwd+bwd",
                "NCHW",
                "channels_last",
                image(clip.visual, pixels),
                image(visual_cl, pixels_cl),
            )
        )
    parts.append(("AdamW step", "loop", "fused", adamw(False), adamw(True)))
    rows = []
    for part, name_a, name_b, run_a, run_b in parts:
        times: dict[str, list[float]] = {name_a: [], name_b: []}
        for i in range(args.warmup + args.steps):
            for name, run in [(name_a, run_a), (name_b, run_b)][:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                run()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times[name_a]), statistics.median(times[name_b])
        rows.append(
            f"| {arch} | {part} | {name_a} {a:.3f} | {name_b} {b:.3f} | {a - b:.3f} | "
            f"{a / b:.2f}x |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
        clip.zero_grad(set_to_none=True)
    return rows


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
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.machine()} "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, native bf16: {'yes' if native else 'no'}"
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
    for arch in args.arch:
        rows += bench_arch(arch, args, bf16)
    print(
        "\n| arch | variant | median s/step | samples/s | vs open_clip fp32 (median) "
        "| (fastest step) | timed steps (s) |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
