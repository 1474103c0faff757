"""Inputs of the benchmarked CLIP train step and its parts timed alone (`--components`), for
contrastive_step.py (run as `python bench/contrastive_step.py`, so this folder is on sys.path)."""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable

import open_clip
import torch

from cliptransfer.clip import create_clip
from cliptransfer.clip.archs import CLIPConfig, get_arch
from cliptransfer.defaults import resolve_tokenizer
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
