"""Optimizer parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cliptransfer.config import check_range


def decays(param: torch.Tensor) -> bool:
    """True if `param` gets weight decay: matrices and conv kernels only.

    Biases, norm weights and scalars (logit scale and bias) are all < 2-d; this is open_clip's
    rule without its name matching, which also caught unrelated names containing "ln" or "bn".
    """
    return param.ndim >= 2


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    grad_clip: float = 1.0  # max grad norm; 0 disables

    def __post_init__(self) -> None:
        # A NaN lr or eps trains silently into NaN weights; refuse it when the config is built.
        check_range("lr", self.lr, gt=0)
        check_range("weight_decay", self.weight_decay, ge=0)
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, ge=0, lt=1)
        check_range("eps", self.eps, gt=0)
        check_range("warmup_steps", self.warmup_steps, ge=0)
        check_range("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_range("grad_clip", self.grad_clip, ge=0)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scales: dict[str, float] | None = None,
    exclude: str | None = None,
) -> list[dict]:
    """AdamW groups: decay / no-decay, and optionally a separate lr scale per name prefix.

    `lr_scales={"visual.": 0.1}` puts the backbone in its own groups with 0.1x the base lr (the
    end-to-end fine-tuning recipe). Frozen parameters are left out, and so are those under the
    name prefix `exclude` (another optimizer trains them).
    """
    lr_scales = lr_scales or {}
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    names: dict[tuple[float, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (exclude and name.startswith(exclude)):
            continue
        scale = next((s for prefix, s in lr_scales.items() if name.startswith(prefix)), 1.0)
        key = (scale, decays(p))
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    out = []
    for (scale, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        out.append(
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "param_names": names[(scale, decay)],
            }
        )
    return out


def build_adamw(
    model: nn.Module,
    cfg: OptimConfig,
    lr_scales: dict[str, float] | None = None,
    fused: bool = False,
    exclude: str | None = None,
):
    groups = param_groups(model, cfg.weight_decay, lr_scales, exclude)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    # torch's AdamW keeps unknown group keys (lr_scale, param_names) in its state_dict untouched.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True if fused else None
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params: Iterable[torch.Tensor] = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total


@dataclass
class OptimizerSpec:
    """One optimizer of a run and its schedule (stepped once per optimizer step, by hand, so
    the schedule does not depend on the number of processes)."""

    name: str  # "adamw", "backbone_sgd", ...: names its lr in the logs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def adamw_spec(
    model: nn.Module,
    cfg: OptimConfig,
    total_steps: int,
    lr_scales: dict[str, float] | None = None,
    *,
    fused: bool = False,
    cap_warmup: bool = True,
    name: str = "adamw",
    exclude: str | None = None,
) -> OptimizerSpec:
    """AdamW over `model`'s trainable parameters (but those under the prefix `exclude`) with
    warmup + cosine over `total_steps`.
    `cap_warmup`: short runs (tests, smoke runs) keep at least 80 % of their steps after warmup."""
    optimizer = build_adamw(model, cfg, lr_scales=lr_scales, fused=fused, exclude=exclude)
    warmup = min(cfg.warmup_steps, total_steps // 5) if cap_warmup else cfg.warmup_steps
    return OptimizerSpec(
        name, optimizer, warmup_cosine(optimizer, warmup, total_steps, cfg.min_lr_ratio)
    )


@dataclass
class BackboneOptimConfig:
    """End to end: how the CLIP backbone trains. "adamw": in the head's AdamW at
    `backbone_lr_scale` x lr; "sgd": its own SGD with step decay beside the head's AdamW, as
    CLIP-ViL_p (lr 3e-3 in pretraining, 1e-3 in fine-tuning; momentum 0; wd 4e-4)."""

    kind: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 4e-4
    decay_every_epochs: int = 0  # lr x gamma every N epochs (0: constant)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check_range("lr", self.lr, gt=0)
        check_range("momentum", self.momentum, ge=0, lt=1)
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("decay_every_epochs", self.decay_every_epochs, ge=0)
        check_range("gamma", self.gamma, gt=0, le=1)


def sgd_step_spec(
    module: nn.Module,
    lr: float,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    step_every: int,
    gamma: float = 0.1,
    name: str = "sgd",
) -> OptimizerSpec:
    """SGD over `module`'s trainable parameters with step decay (lr x gamma every `step_every`
    optimizer steps): CLIP-ViL_p's optimizer for the CLIP backbone (lr 0.003, momentum 0, wd
    4e-4), run beside the fusion model's AdamW as a second `OptimizerSpec`."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return OptimizerSpec(
        name, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_every, gamma)
    )
