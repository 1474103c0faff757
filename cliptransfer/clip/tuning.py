"""Which CLIP parameters train: locked towers and partial unfreezing; the adapter presets.

Adapters themselves (LoRA, LoHa, IA3) come from one place, `cliptransfer.adapters` (the PEFT
library), for pretraining and tasks alike; `LORA_TARGETS` are its per-tower presets, regexes over
module names: ResNet convs, ViT qkv/proj/fc1/fc2, the text tower's out_proj/c_fc/c_proj.
BatchNorm has an explicit policy: "freeze" turns every BatchNorm of a locked ResNet into timm's
FrozenBatchNorm (fixed statistics and affine), "train" leaves it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from cliptransfer.config import check_range

LORA_TARGETS = {
    # Image-tower patterns are relative to the tower (`visual.` in CLIP, `backbone.` in tasks).
    "resnet": r"(stem|stages)\.(.*\.)?conv\w*\.conv",  # the Conv2d inside each ConvNormAct
    "vit": r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
    "text": r"transformer\.resblocks\.\d+\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)",
}


@dataclass
class TuningConfig:
    lock_image: bool = False  # freeze the image tower (LiT-style when training the text tower)
    lock_image_unlocked_groups: int = 0  # with lock_image: keep the last N stages/blocks trainable
    lock_text: bool = False
    bn_policy: Literal["freeze", "train"] = "freeze"

    def __post_init__(self) -> None:
        check_range("lock_image_unlocked_groups", self.lock_image_unlocked_groups, ge=0)


def _vision_kind(clip: nn.Module) -> str:
    return clip.config.vision.kind


def _image_groups(clip: nn.Module) -> list[nn.Module]:
    """The image tower's blocks in order (ViT blocks, or ResNet stages), for partial unlocking."""
    visual = clip.visual
    if _vision_kind(clip) == "vit":
        return list(visual.blocks)
    return list(visual.stages)


def _freeze_bn(module: nn.Module) -> nn.Module:
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def apply_tuning(clip: nn.Module, cfg: TuningConfig) -> nn.Module:
    """Freeze/unfreeze CLIP parameters in place (adapters: `cliptransfer.adapters`)."""
    if cfg.lock_image:
        for p in clip.visual.parameters():
            p.requires_grad = False
        if cfg.lock_image_unlocked_groups:
            for group in _image_groups(clip)[-cfg.lock_image_unlocked_groups :]:
                for p in group.parameters():
                    p.requires_grad = True
        if cfg.bn_policy == "freeze" and _vision_kind(clip) == "resnet":
            clip.visual = _freeze_bn(clip.visual)
    if cfg.lock_text:
        for name, p in clip.named_parameters():
            if not name.startswith("visual.") and name != "logit_scale":
                p.requires_grad = False
    return clip


def export_clip(clip: nn.Module) -> nn.Module:
    """A plain CLIP equal to `clip` (adapters already merged by `adapters.merge`): frozen
    BatchNorms turned back into ordinary ones. This is what `save_pretrained` should write."""
    from cliptransfer.clip import CLIP

    plain = CLIP(clip.config)
    missing, unexpected = plain.load_state_dict(clip.state_dict(), strict=False)
    # FrozenBatchNorm keeps no step counter: the only keys it may lack.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"export_clip: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return plain.to(next(clip.parameters()).device)
