"""A CLIP image tower as an end-to-end grid encoder for the task heads."""

from __future__ import annotations

import torch
from torch import nn

from cliptransfer.clip import grid as grid_ops
from cliptransfer.clip.tuning import TuningConfig, apply_tuning

__all__ = ["GridBackbone"]


class GridBackbone(nn.Module):
    """A CLIP image tower as an end-to-end grid encoder: pixels (B, 3, H, W) -> (B, H*W, C).

    `tuning` decides what trains (see `cliptransfer.clip.tuning`): nothing locked = full fine-tuning,
    `lock_image` = frozen (run without autograd); adapters are attached to the whole task model
    by `cliptransfer.adapters` (peft.method=...). Only the image tower is kept; the text tower is dropped.
    """

    def __init__(self, clip: nn.Module, tuning: TuningConfig | None = None) -> None:
        super().__init__()
        apply_tuning(clip, tuning or TuningConfig())
        self.visual = clip.visual
        self.frozen = not any(p.requires_grad for p in self.visual.parameters())
        self.channels = int(
            grid_ops.encode_grid(self.visual.eval(), torch.zeros(1, 3, 64, 64))[0].shape[-1]
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return grid_ops.encode_grid(self.visual, pixels)  # (B, H*W, C), (H, W)
