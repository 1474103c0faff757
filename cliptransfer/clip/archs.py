"""CLIP architectures as data: config dataclasses and the named architecture table."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARCHS",
    "CLIPConfig",
    "TextConfig",
    "UnknownArchError",
    "VisionConfig",
    "get_arch",
    "list_archs",
]


class UnknownArchError(ValueError):
    """An architecture name that is not in the table."""


@dataclass
class VisionConfig:
    """Image tower sizes.

    kind "vit": `width` is the token width, `layers` the depth, `heads` the attention heads.
    kind "resnet": OpenAI ModifiedResNet sizes: `width` is the stem width (64 for RN50), stage
    channels are 4w, 8w, 16w, 32w, `layers` the blocks per stage, `heads` the attention-pool heads
    (timm's pool fixes head_dim at 64, so heads must be 32 * width // 64).
    `timm_name` optionally names the equivalent registered timm model (built with
    pretrained=False); the explicit sizes stay the source of truth and are checked against it.
    """

    kind: str = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    patch_size: int = 32
    mlp_ratio: float = 4.0
    timm_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision.kind must be 'vit' or 'resnet', got {self.kind!r}")
        if self.kind == "resnet":
            if not isinstance(self.layers, tuple) or len(self.layers) != 4:
                raise ValueError(
                    f"resnet vision.layers must be 4 stage depths, got {self.layers!r}"
                )
            if self.width % 8:
                # timm rounds bottleneck widths to multiples of 8; OpenAI widths all qualify.
                raise ValueError(f"resnet vision.width must be a multiple of 8, got {self.width}")
            if self.heads != self.width // 2:
                raise ValueError(
                    f"resnet vision.heads must be width*32//64 = {self.width // 2} "
                    f"(head_dim 64, as OpenAI and timm), got {self.heads}"
                )
        else:
            if not isinstance(self.layers, int):
                raise ValueError(f"vit vision.layers must be an int depth, got {self.layers!r}")
            if self.width % self.heads:
                raise ValueError(
                    f"vision.width {self.width} not divisible by vision.heads {self.heads}"
                )


@dataclass
class TextConfig:
    """Text transformer sizes (OpenAI layout). Depth/width are free: the 'curtailed' text knob."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} not divisible by text.heads {self.heads}")


@dataclass
class CLIPConfig:
    """Dual-encoder config; `quick_gelu` applies to both towers (ResNet towers use ReLU)."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        vision = _build(VisionConfig, d.pop("vision", {}), "vision")
        text = _build(TextConfig, d.pop("text", {}), "text")
        return _build(cls, {**d, "vision": vision, "text": text}, "")


def _build(cls: type, d: dict[str, Any] | Any, where: str) -> Any:
    if dataclasses.is_dataclass(d):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"config section {where or 'top level'!r} must be a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"unknown {where + ' ' if where else ''}config field(s) {unknown}; "
            f"valid: {sorted(names)}"
        )
    return cls(**d)


def _openai(
    embed_dim: int,
    vision: VisionConfig,
    text_width: int = 512,
    text_heads: int = 8,
) -> CLIPConfig:
    text = TextConfig(context_length=77, vocab_size=49408, width=text_width, heads=text_heads)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=True)


def _rn(layers: tuple[int, ...], width: int, image_size: int, timm_name: str) -> VisionConfig:
    return VisionConfig(
        kind="resnet",
        image_size=image_size,
        width=width,
        layers=layers,
        heads=width // 2,
        timm_name=timm_name,
    )


def _vit(patch: int, timm_name: str) -> VisionConfig:
    return VisionConfig(
        kind="vit",
        image_size=224,
        width=768,
        layers=12,
        heads=12,
        patch_size=patch,
        timm_name=timm_name,
    )


# Published OpenAI sizes (openai/CLIP model cards) plus tiny CPU configs for tests / the toy world.
ARCHS: dict[str, CLIPConfig] = {
    "RN50": _openai(1024, _rn((3, 4, 6, 3), 64, 224, "resnet50_clip")),
    "RN101": _openai(512, _rn((3, 4, 23, 3), 64, 224, "resnet101_clip")),
    "RN50x4": _openai(640, _rn((4, 6, 10, 6), 80, 288, "resnet50x4_clip"), 640, 10),
    "ViT-B-32": _openai(512, _vit(32, "vit_base_patch32_clip_224")),
    "ViT-B-16": _openai(512, _vit(16, "vit_base_patch16_clip_224")),
    "RN-tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=4),
        text=TextConfig(context_length=48, vocab_size=1024, width=128, heads=2, layers=2),
    ),
    "ViT-tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(kind="vit", image_size=64, width=128, layers=2, heads=2, patch_size=8),
        text=TextConfig(context_length=48, vocab_size=1024, width=128, heads=2, layers=2),
    ),
}


def list_archs() -> list[str]:
    """Names accepted by `create_clip`."""
    return list(ARCHS)


def get_arch(name: str) -> CLIPConfig:
    """A fresh (deep-copied) config for a named architecture."""
    if name not in ARCHS:
        raise UnknownArchError(f"unknown CLIP architecture {name!r}; available: {list_archs()}")
    return CLIPConfig.from_dict(ARCHS[name].to_dict())


def apply_overrides(cfg: CLIPConfig, overrides: dict[str, Any]) -> CLIPConfig:
    """Override top-level fields, or nested fields with dicts: {"text": {"layers": 4}}."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        if key in ("vision", "text") and isinstance(value, dict):
            d[key] = {**d[key], **value}
            if key == "vision" and "timm_name" not in value:
                # Resized towers no longer match the registered timm model: build from sizes.
                d[key]["timm_name"] = None
        else:
            if key not in d:
                raise ValueError(f"unknown CLIP config field {key!r}; valid: {sorted(d)}")
            d[key] = value
    return CLIPConfig.from_dict(d)
