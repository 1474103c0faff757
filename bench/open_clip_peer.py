"""The peer the benchmarks measure against: open_clip's own model of an arch, and ours with the
same weights. Shared by contrastive_step.py and grid_extract.py (run as `python bench/X.py`, so
this folder is on sys.path)."""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch

from cliptransfer.clip import CLIP, create_clip
from cliptransfer.clip.archs import CLIPConfig
from cliptransfer.clip.convert import openai_to_project
from cliptransfer.clip.loading import load_state_dict_checked


def native_bf16_cpu() -> bool:
    """True if the CPU computes bf16 natively (AVX512-BF16 or AMX). Without it, oneDNN emulates
    bf16 by converting to fp32, and autocast is usually slower than plain fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def open_clip_model(
    arch: str, cfg: CLIPConfig, image_size: tuple[int, int] | None = None
) -> torch.nn.Module:
    """open_clip's own model for `arch`: its named config when it has one, else the same sizes
    through `open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg)`. `image_size` (H, W) builds
    a ViT for that input (its position embedding sized for the new grid: load weights with
    `resize_pos_embed`)."""
    name = f"{arch}-quickgelu" if cfg.quick_gelu else arch
    if name in open_clip.list_models():
        logging.disable(logging.WARNING)  # "No pretrained weights loaded": intended
        try:
            return open_clip.create_model(name, pretrained=None, force_image_size=image_size)
        finally:
            logging.disable(logging.NOTSET)
    v, t = cfg.vision, cfg.text
    vision = dict(image_size=image_size or v.image_size, width=v.width, mlp_ratio=v.mlp_ratio)
    if v.kind == "resnet":
        vision["layers"] = list(v.layers)  # heads = 32 * width // 64, as ours
    else:
        vision.update(layers=v.layers, patch_size=v.patch_size, head_width=v.width // v.heads)
    text = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_ratio,
    )
    return open_clip.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.quick_gelu)


def ours_from_open_clip(arch: str, ref: torch.nn.Module) -> CLIP:
    """Our CLIP with open_clip's weights (its state dict is the OpenAI layout)."""
    model = create_clip(arch)
    sd = openai_to_project(ref.state_dict(), model.visual)
    load_state_dict_checked(model, sd, f"open_clip {arch} state dict")
    return model
