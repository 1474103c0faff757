"""Grid features from CLIP image towers at any input size.

ResNet: layer4 output before the attention pool (CLIP-ViL), 600x1000 -> 18x31 for RN50.
ViT: patch tokens after the final LayerNorm with the absolute position embedding resampled
(bicubic) from the trained square grid to the input's (H/p, W/p) grid, class-token entry kept.
CLIP-ViL's ViT variant silently zeroed the patch position embedding; here it is resampled.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.byobnet import ByobNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
    "encode_grid",
    "encode_image_tokens",
    "resample_pos_embed",
    "resnet_value_tokens",
    "vit_tokens",
]


def resample_pos_embed(
    pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int]
) -> torch.Tensor:
    """Resample a (1, 1 + h*w, C) embedding (class entry first) to (1, 1 + H*W, C).

    Bicubic, align_corners=False, no antialias: HF's `interpolate_pos_encoding` and open_clip's
    `resize_pos_embed(..., antialias=False)` (open_clip's default, antialias=True, is another
    kernel: 1.3e-2 apart on ViT-B/32 at 384x640; bench/grid_extract.py).
    Identity (same tensor) at the native size.
    """
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_size),
        old_size=list(old_size),
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )


def _check_pixels(pixels: torch.Tensor, min_size: int) -> None:
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    if min(pixels.shape[-2:]) < min_size:
        raise ValueError(
            f"image {tuple(pixels.shape[-2:])} is smaller than the tower's stride {min_size}"
        )


def vit_tokens(
    visual: VisionTransformer, pixels: torch.Tensor, pos_embed: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """All tokens after the final norm, (B, 1 + H*W, C), at any input size.

    `pos_embed` (1, 1 + H*W, C) replaces the resampled embedding (used to test the CLIP-ViL bug).
    Sizes that are not multiples of the patch size are floored, like the strided conv.
    """
    patch = visual.patch_embed.patch_size
    _check_pixels(pixels, max(patch))
    x = visual.patch_embed.proj(pixels)  # (B, C, H, W)
    hw = (x.shape[-2], x.shape[-1])
    x = visual.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, H*W, C)
    if pos_embed is None:
        pos_embed = resample_pos_embed(visual.pos_embed, hw, tuple(visual.patch_embed.grid_size))
    cls = visual.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + pos_embed.to(x.dtype)  # (B, 1 + H*W, C)
    x = visual.norm_pre(visual.patch_drop(visual.pos_drop(x)))
    if visual.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(visual.blocks, x)
    else:
        x = visual.blocks(x)
    return visual.norm(x), hw


def resnet_value_tokens(visual: ByobNet, feats: torch.Tensor) -> torch.Tensor:
    """Per-location value + output projections of the attention pool (MaskCLIP). (B, H*W, D)

    The pool's output is an attention-weighted mean of these (plus the mean-token's value), so
    they live in the joint embedding space. Position embedding resampled as the pool does.
    """
    head = visual.head
    H, W = feats.shape[-2:]
    x = feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
    pos = resample_abs_pos_embed(
        head.pos_embed.unsqueeze(0), (H, W), old_size=head.feat_size, num_prefix_tokens=1
    )
    x = x + pos[:, 1:].to(x.dtype)
    return head.proj(head.v(x))


def encode_grid(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Grid features (B, H*W, C) and the grid size (H, W) for any input size."""
    if isinstance(visual, VisionTransformer):
        x, hw = vit_tokens(visual, pixels)
        return x[:, visual.num_prefix_tokens :], hw
    _check_pixels(pixels, 32)
    feats = visual.forward_features(pixels)  # (B, C, H, W)
    hw = (feats.shape[-2], feats.shape[-1])
    return feats.flatten(2).transpose(1, 2), hw


def encode_image_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Projected per-token image embeddings (B, N, D) for FILIP-style late interaction."""
    if isinstance(visual, VisionTransformer):
        x, _ = vit_tokens(visual, pixels)
        return visual.head(x[:, visual.num_prefix_tokens :])
    _check_pixels(pixels, 32)
    return resnet_value_tokens(visual, visual.forward_features(pixels))
