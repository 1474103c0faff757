"""CLIP dual encoder: a timm image tower (`visual.*`) and the OpenAI-layout text transformer.

The state dict is OpenAI's text keys at the top level, timm's keys under `visual.`, and the
scalar `logit_scale`. Embeddings are unnormalized, as in OpenAI's `encode_image/encode_text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from cliptransfer.fileio import write_json

from . import grid
from .archs import CLIPConfig, apply_overrides, get_arch
from .text import TextTower
from .vision import build_vision_tower

__all__ = ["CLIP", "CLIPOutput", "CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "create_clip"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CLIPOutput(NamedTuple):
    image_embeds: torch.Tensor  # (B, D) unnormalized
    text_embeds: torch.Tensor  # (B, D) unnormalized
    logit_scale: torch.Tensor  # () = exp(logit_scale parameter), unclamped


class CLIP(TextTower):
    """CLIP with a timm image tower; see `create_clip` and `load_clip`."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config.text, config.embed_dim, config.quick_gelu)
        self.config = config
        self.visual = build_vision_tower(config.vision, config.embed_dim, config.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalized image embeddings (B, D) from (B, 3, H, W) pixels at the native size."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        return self.visual(pixels)

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(
            self.encode_image(pixels), self.encode_text(token_ids), self.logit_scale.exp()
        )

    def encode_grid(
        self, pixels: torch.Tensor, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Grid features (B, H*W, C) and (H, W) for any input size.

        Runs in the parameters' dtype (fp32 from `load_clip`); another `dtype` (e.g. bf16)
        runs under autocast and returns features in that dtype.
        """
        if dtype is None or dtype == self.dtype:
            return grid.encode_grid(self.visual, pixels.to(self.dtype))
        with torch.autocast(pixels.device.type, dtype=dtype):
            feats, hw = grid.encode_grid(self.visual, pixels)
        return feats.to(dtype), hw

    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected per-token image embeddings (B, N, D) (FILIP late interaction)."""
        return grid.encode_image_tokens(self.visual, pixels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def save_pretrained(self, save_dir: str | Path) -> None:
        """Write model.safetensors + config.json (the project's own format, bitwise round trip)."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        meta: dict[str, Any] = {
            "cliptransfer": {"kind": "clip", "format_version": FORMAT_VERSION},
            "dtype": str(self.dtype).removeprefix("torch."),
            "config": self.config.to_dict(),
        }
        write_json(save_dir / CONFIG_NAME, meta)


def create_clip(arch: str | CLIPConfig, **overrides: Any) -> CLIP:
    """Build a randomly initialized CLIP from an arch name or config, with field overrides.

    `create_clip("RN50", quick_gelu=False, text={"layers": 4, "width": 256})`
    """
    cfg = get_arch(arch) if isinstance(arch, str) else CLIPConfig.from_dict(arch.to_dict())
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return CLIP(cfg)
