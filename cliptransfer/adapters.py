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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from torch import nn

from cliptransfer.clip.tuning import LORA_TARGETS
from cliptransfer.config import check, check_range
from cliptransfer.engine.optim import trainable_summary

METHODS = ("lora", "loha", "ia3")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class AdapterConfig:
    method: Literal["none", "lora", "loha", "ia3"] = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # auto: the backbone when the model has one (end2end), else the fusion model (features)
    scope: Literal["auto", "backbone", "fusion", "both"] = "auto"
    # Trained in full and saved with the adapter. Empty: everything outside the backbone when
    # only the backbone is adapted, else the classifier.
    modules_to_save: list[str] = field(default_factory=list)
    bn_policy: Literal["freeze", "train"] = "freeze"
    # The CLIP towers the backbone scope adapts: a task's backbone is the image tower only;
    # pretraining (backbone = the whole CLIP) may add "text".
    towers: list[str] = field(default_factory=lambda: ["image"])

    def __post_init__(self) -> None:
        ok = bool(self.towers) and set(self.towers) <= {"image", "text"}
        check(ok, "towers", "must name 'image' and/or 'text'", list(self.towers))
        check_range("r", self.r, ge=1)
        check_range("alpha", self.alpha, gt=0)
        check_range("dropout", self.dropout, ge=0, lt=1)


def _wrappable(name: str, module: nn.Module) -> list[str]:
    """`name`, or its children's names for the containers PEFT cannot wrap (ModuleList/Dict)."""
    if isinstance(module, nn.ModuleList | nn.ModuleDict):
        return [n for sub, m in module.named_children() for n in _wrappable(f"{name}.{sub}", m)]
    return [name]


def resolve(
    cfg: AdapterConfig, model: nn.Module, backbone_prefix: str = "backbone"
) -> AdapterConfig:
    """`cfg` with scope "auto" and empty `modules_to_save` made concrete for `model`."""
    scope = cfg.scope
    if scope == "auto":
        backbone = getattr(model, backbone_prefix, None)
        scope = "backbone" if backbone is not None else "fusion"
    save = list(cfg.modules_to_save)
    if not save and scope == "backbone":
        # Every module outside the backbone trains in full, named two levels deep: PEFT matches
        # these names as suffixes, and a bare "head" would also catch `backbone.visual.head`.
        for name, child in model.named_children():
            if name != backbone_prefix:
                for sub, grandchild in child.named_children():
                    save += _wrappable(f"{name}.{sub}", grandchild)
    return replace(cfg, scope=scope, modules_to_save=save or ["classifier"])


def prepare_base(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Apply the BatchNorm policy in place: "freeze" turns every BatchNorm into timm's
    FrozenBatchNorm2d (also needed before loading merged weights into a fresh model)."""
    if cfg.bn_policy == "freeze":
        from timm.layers import freeze_batch_norm_2d

        for name, child in list(model.named_children()):
            setattr(model, name, freeze_batch_norm_2d(child))
    return model


def backbone_targets(
    model: nn.Module, prefix: str = "backbone.", towers: tuple[str, ...] = ("image",)
) -> list[str]:
    """Full names of the tower modules the presets adapt (ResNet convs / ViT linears for the
    image tower, attention out_proj / MLP for the text tower)."""
    names = []
    for kind, pattern in LORA_TARGETS.items():
        if ("text" if kind == "text" else "image") not in towers:
            continue
        rx = re.compile(rf"{re.escape(prefix)}(.*\.)?{pattern}")
        names += [n for n, m in model.named_modules() if rx.fullmatch(n) and _adaptable(m)]
    return sorted(set(names))


def fusion_targets(model: nn.Module, exclude: tuple[str, ...]) -> list[str]:
    """Every Linear outside the backbone and the fully trained heads."""

    # PEFT matches `modules_to_save` names as suffixes ("classifier" = "head.classifier").
    def inside(n: str, e: str) -> bool:
        return f".{e}." in f".{n}."

    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(inside(n, e) for e in exclude)
    ]


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.Conv2d)


def wrap(model: nn.Module, cfg: AdapterConfig, backbone_prefix: str = "backbone"):
    """Wrap `model` in a PeftModel per `cfg`; prints nothing, returns (peft_model, targets)."""
    import peft

    if cfg.method not in METHODS:
        raise ValueError(f"unknown PEFT method {cfg.method!r}; choose from {', '.join(METHODS)}")
    cfg = resolve(cfg, model, backbone_prefix)
    prepare_base(model, cfg)
    save = list(cfg.modules_to_save)
    if cfg.bn_policy == "train":
        save += [n for n, m in model.named_modules() if isinstance(m, _BN)]
    targets: list[str] = []
    if cfg.scope in ("backbone", "both"):
        targets += backbone_targets(model, backbone_prefix + ".", tuple(cfg.towers))
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
    """(trainable, total, trainable percent) parameter counts."""
    trainable, total = trainable_summary(model)
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
    if cfg is not None:
        prepare_base(base, cfg)
    return peft.PeftModel.from_pretrained(base, str(folder))


def merge(peft_model) -> nn.Module:
    """Fold the adapter weights into the base weights and return the plain model (in place).

    PEFT's `merge_and_unload` writes merged weights through `weight.data`, which a parametrized
    weight (the heads' weight-normed layers) recomputes away, and fails on `modules_to_save`
    without a `.weight` (a GRU, a Sequential). Here a parametrized base weight is made plain for
    the merge and re-parametrized after it (same g, v split), and each `modules_to_save` wrapper
    is replaced by its trained copy.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    model = peft_model.get_base_model()
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            dims = None
            if parametrize.is_parametrized(base, "weight"):
                dims = [p.dim for p in base.parametrizations.weight]
                parametrize.remove_parametrizations(base, "weight", leave_parametrized=True)
            module.merge()
            if dims is not None:
                if len(dims) != 1:
                    raise ValueError(f"{name}: only a single weight_norm parametrization merges")
                weight_norm(base, "weight", dim=dims[0])
            replacements.append((name, base))
        elif isinstance(module, ModulesToSaveWrapper):
            replacements.append((name, module.modules_to_save[module.active_adapter]))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
