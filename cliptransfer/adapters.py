"""PEFT adapters (LoRA, LoHa, IA3) on task models: presets, adapter-only folders, reload, merge.

Targets come from presets rather than hand-written lists: the CLIP image tower's convs (ResNet) or
qkv/proj/fc1/fc2 (ViT) when the backbone is tuned end to end, and every Linear of the fusion model
when it is (feature mode). New heads are trained in full (`modules_to_save`). BatchNorm has an
explicit policy: "freeze" turns it into timm's FrozenBatchNorm before wrapping (statistics and
affine fixed), "train" adds every BatchNorm to `modules_to_save` (trained and saved with the
adapter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from cliptransfer.tuning import LORA_TARGETS

METHODS = ("lora", "loha", "ia3")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class AdapterConfig:
    method: Literal["lora", "loha", "ia3"] = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    scope: Literal["backbone", "fusion", "both"] = "backbone"
    modules_to_save: list[str] = field(default_factory=lambda: ["classifier"])
    bn_policy: Literal["freeze", "train"] = "freeze"


def backbone_targets(model: nn.Module, prefix: str = "backbone.") -> list[str]:
    """Full names of the image-tower modules the preset adapts (ResNet convs / ViT linears)."""
    names = []
    for kind, pattern in LORA_TARGETS.items():
        if kind == "text":
            continue
        rx = re.compile(rf"{re.escape(prefix)}(.*\.)?{pattern}")
        names += [n for n, m in model.named_modules() if rx.fullmatch(n) and _adaptable(m)]
    return sorted(set(names))


def fusion_targets(model: nn.Module, exclude: tuple[str, ...]) -> list[str]:
    """Every Linear outside the backbone and the fully trained heads."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == e or n.startswith(e + ".") for e in exclude)
    ]


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.Conv2d)


def wrap(model: nn.Module, cfg: AdapterConfig, backbone_prefix: str = "backbone"):
    """Wrap `model` in a PeftModel per `cfg`; prints nothing, returns (peft_model, targets)."""
    import peft

    if cfg.method not in METHODS:
        raise ValueError(f"unknown PEFT method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.bn_policy == "freeze":
        from timm.layers import freeze_batch_norm_2d

        for name, child in list(model.named_children()):
            setattr(model, name, freeze_batch_norm_2d(child))
    save = list(cfg.modules_to_save)
    if cfg.bn_policy == "train":
        save += [n for n, m in model.named_modules() if isinstance(m, _BN)]
    targets: list[str] = []
    if cfg.scope in ("backbone", "both"):
        targets += backbone_targets(model, backbone_prefix + ".")
    if cfg.scope in ("fusion", "both"):
        targets += fusion_targets(model, (backbone_prefix, *cfg.modules_to_save))
    if not targets:
        raise ValueError(f"no modules to adapt for scope {cfg.scope!r} in {type(model).__name__}")
    if cfg.method == "lora":
        config = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            modules_to_save=save,
        )
    elif cfg.method == "loha":
        config = peft.LoHaConfig(
            r=cfg.r, alpha=cfg.alpha, target_modules=targets, modules_to_save=save
        )
    else:  # IA3 rescales activations; its feed-forward set is the MLP/conv layers
        ff = [t for t in targets if not re.search(r"(qkv|attn)", t)]
        config = peft.IA3Config(
            target_modules=targets, feedforward_modules=ff, modules_to_save=save
        )
    return peft.get_peft_model(model, config), targets


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, 100.0 * trainable / max(1, total)


def save_adapter(peft_model, folder: str | Path) -> Path:
    """Adapter-only folder (adapter_config.json + adapter_model.safetensors), written atomically."""
    from cliptransfer.fileio import atomic_save_dir

    return atomic_save_dir(lambda d: peft_model.save_pretrained(str(d)), folder)


def load_adapter(base: nn.Module, folder: str | Path, cfg: AdapterConfig | None = None):
    """Re-attach a saved adapter to a freshly built base model (same architecture)."""
    import peft

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json)")
    if cfg is not None and cfg.bn_policy == "freeze":
        from timm.layers import freeze_batch_norm_2d

        for name, child in list(base.named_children()):
            setattr(base, name, freeze_batch_norm_2d(child))
    return peft.PeftModel.from_pretrained(base, str(folder))


def merge(peft_model) -> nn.Module:
    """Fold the adapter weights into the base weights and return the plain model."""
    return peft_model.merge_and_unload()
