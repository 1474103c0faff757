"""Which CLIP parameters train: locked towers, partial unfreezing, and LoRA adapters (PEFT).

LoRA targets are presets per tower, written as regexes over module names (PEFT matches a string
`target_modules` as a full-match regex): ResNet convs, ViT qkv/proj/fc1/fc2, and the text tower's
out_proj/c_fc/c_proj. BatchNorm has an explicit policy: "freeze" turns every BatchNorm of a locked
or LoRA-tuned ResNet into timm's FrozenBatchNorm (fixed statistics and affine), "train" leaves it
as is (statistics update, affine trainable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from cliptransfer.config import check, check_range

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
    peft: Literal["lora"] | None = None  # LoRA adapters on both towers (base weights frozen)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_towers: tuple[str, ...] = ("image", "text")
    bn_policy: Literal["freeze", "train"] = "freeze"

    def __post_init__(self) -> None:
        check_range("lock_image_unlocked_groups", self.lock_image_unlocked_groups, ge=0)
        check_range("lora_r", self.lora_r, ge=1)
        check_range("lora_alpha", self.lora_alpha, gt=0)
        check_range("lora_dropout", self.lora_dropout, ge=0, lt=1)
        towers = tuple(self.lora_towers)
        ok = bool(towers) and set(towers) <= {"image", "text"}
        check(ok, "lora_towers", "must name 'image' and/or 'text'", towers)


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


def lora_target_regex(clip: nn.Module, towers: tuple[str, ...] = ("image", "text")) -> str:
    parts = []
    if "image" in towers:
        parts.append(r"visual\." + LORA_TARGETS[_vision_kind(clip)])
    if "text" in towers:
        parts.append(LORA_TARGETS["text"])
    if not parts:
        raise ValueError(f"tuning.lora_towers must name 'image' and/or 'text', got {towers}")
    # PEFT full-matches the regex against the module's qualified name.
    return r"(.*\.)?(" + "|".join(parts) + r")"


def apply_tuning(clip: nn.Module, cfg: TuningConfig) -> nn.Module:
    """Freeze/unfreeze CLIP parameters in place and inject LoRA adapters when asked."""
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
    if cfg.peft == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=lora_target_regex(clip, tuple(cfg.lora_towers)),
        )
        inject_adapter_in_model(config, clip)
        for name, p in clip.named_parameters():
            p.requires_grad = "lora_" in name
        if cfg.bn_policy == "freeze" and _vision_kind(clip) == "resnet":
            clip.visual = _freeze_bn(clip.visual)
    elif cfg.peft is not None:
        raise ValueError(f"tuning.peft: unknown method {cfg.peft!r} (supported: lora)")
    return clip


def export_clip(clip: nn.Module) -> nn.Module:
    """A plain CLIP equal to `clip`: LoRA adapters merged into their base weights, frozen BatchNorms
    turned back into ordinary ones. This is what `save_pretrained` should write after tuning."""
    import copy

    from peft.tuners.lora import LoraLayer

    from cliptransfer.clip import CLIP

    merged = copy.deepcopy(clip)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {
        k.replace(".base_layer.", "."): v
        for k, v in merged.state_dict().items()
        if "lora_" not in k
    }
    plain = CLIP(clip.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # FrozenBatchNorm keeps no step counter: the only keys it may lack.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"export_clip: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return plain.to(next(clip.parameters()).device)
