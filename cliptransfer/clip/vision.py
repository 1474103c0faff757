"""CLIP image towers built from timm modules (ByobNet CLIP-ResNets, VisionTransformer).

Towers are always made with pretrained=False; weights come from `loading.load_clip`.
Output of `tower(pixels)` is the projected, unnormalized image embedding (B, embed_dim).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import timm
from timm.layers import AttentionPool2d
from timm.models import byobnet
from timm.models.byobnet import ByoBlockCfg, ByobNet, DownsampleAvg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .archs import VisionConfig

__all__ = ["build_vision_tower", "resnet_model_cfg"]


def resnet_model_cfg(cfg: VisionConfig) -> byobnet.ByoModelCfg:
    """timm ByoModelCfg for an OpenAI ModifiedResNet of any depth/width (timm's CLIP design)."""
    w = cfg.width
    blocks = tuple(
        ByoBlockCfg(type="bottle", d=d, c=4 * w * 2**i, s=1 if i == 0 else 2, br=0.25)
        for i, d in enumerate(cfg.layers)
    )
    # Same stem / avg-pool anti-aliasing / attention-pool head as timm's resnet50_clip.
    return dataclasses.replace(
        byobnet.model_cfgs["resnet50_clip"],
        blocks=blocks,
        stem_chs=(w // 2, w // 2, w),
        width_factor=1.0,
    )


def _vit_kwargs(cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> dict:
    return dict(
        img_size=cfg.image_size,
        num_classes=embed_dim,
        act_layer="quick_gelu" if quick_gelu else "gelu",
    )


def _build_vit(cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> VisionTransformer:
    kwargs = _vit_kwargs(cfg, embed_dim, quick_gelu)
    if cfg.timm_name:
        tower = timm.create_model(cfg.timm_name, pretrained=False, use_naflex=False, **kwargs)
    else:
        tower = VisionTransformer(
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.layers,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            pre_norm=True,  # CLIP's ln_pre
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
            global_pool="token",
            class_token=True,
            **kwargs,
        )
    # CLIP's projection has no bias (timm's converted checkpoints carry a zero one).
    tower.head = nn.Linear(cfg.width, embed_dim, bias=False)
    nn.init.normal_(tower.head.weight, std=cfg.width**-0.5)
    return tower


def _build_resnet(cfg: VisionConfig, embed_dim: int) -> ByobNet:
    if cfg.timm_name:
        tower = timm.create_model(
            cfg.timm_name, pretrained=False, num_classes=embed_dim, img_size=cfg.image_size
        )
    else:
        tower = ByobNet(resnet_model_cfg(cfg), num_classes=embed_dim, img_size=cfg.image_size)
    _floor_shortcut_pools(tower)
    return tower


def _floor_shortcut_pools(tower: ByobNet) -> None:
    """Make shortcut avg-pools floor like OpenAI's `nn.AvgPool2d(stride)`.

    timm's DownsampleAvg uses ceil_mode=True while the main path's anti-alias pool floors: equal
    at 224 px, but at odd feature sizes (600x1000 -> 75x125 before layer3) the two paths
    disagree and the residual add fails. OpenAI floors both, giving CLIP-ViL's 18x31 grid.
    """
    for m in tower.modules():
        if isinstance(m, DownsampleAvg) and isinstance(m.pool, nn.AvgPool2d):
            m.pool = nn.AvgPool2d(m.pool.kernel_size, m.pool.stride)


def _check_tower(cfg: VisionConfig, tower: nn.Module) -> None:
    """Make sure a timm-named tower has the sizes the config states (they drive conversion)."""
    if cfg.kind == "vit":
        if not isinstance(tower, VisionTransformer):
            raise ValueError(f"timm model {cfg.timm_name!r} is not a VisionTransformer")
        got = dict(
            width=tower.embed_dim,
            layers=len(tower.blocks),
            heads=tower.blocks[0].attn.num_heads,
            patch_size=tower.patch_embed.patch_size[0],
            mlp_ratio=tower.blocks[0].mlp.fc1.out_features / tower.embed_dim,
        )
    else:
        if not isinstance(tower, ByobNet) or not isinstance(tower.head, AttentionPool2d):
            raise ValueError(f"timm model {cfg.timm_name!r} is not an attention-pool ByobNet")
        got = dict(
            width=tower.stem.conv3.conv.out_channels,
            layers=tuple(len(s) for s in tower.stages),
            heads=tower.head.num_heads,
        )
    want = {k: getattr(cfg, k) for k in got}
    if got != want:
        raise ValueError(f"timm model {cfg.timm_name!r} has sizes {got}, config says {want}")


def build_vision_tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> nn.Module:
    """A timm image tower whose forward returns (B, embed_dim) CLIP image embeddings."""
    if cfg.kind == "vit":
        tower = _build_vit(cfg, embed_dim, quick_gelu)
    else:
        tower = _build_resnet(cfg, embed_dim)
    _check_tower(cfg, tower)
    return tower
