"""A task model over image features or pixels: the head (top-down or MCAN) and, end to end, the
CLIP image tower as a grid encoder.

One interface for both modes: `head(features (B, N, C), mask (B, N), text_ids (B, L),
text_mask (B, L), spatial (B, N, 4)) -> logits (B, K)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cliptransfer.heads.mcan import MCAN, MCANConfig
from cliptransfer.heads.question import QuestionConfig, build_question_encoder
from cliptransfer.heads.registry import get_head, register_head
from cliptransfer.heads.scan import SCANConfig, WordRegionFusion
from cliptransfer.heads.topdown import TopDown, TopDownConfig
from cliptransfer.heads.vlbert import VLBertConfig
from cliptransfer.visual.inputs import grid_inputs

__all__ = ["HeadConfig", "VLModel", "build_head", "shapes_head"]


@dataclass
class HeadConfig:
    """`model` of a task config. The task configs (VQA, SNLI-VE) start from `shapes_head()`, the
    word-to-region head with a small MCAN beside it; the per-head sections' own defaults are
    what a YAML gets for a field it leaves out."""

    arch: str = "mcan"  # a registered head (cliptransfer.heads.registry): mcan, topdown, ...
    spatial: bool = True  # feed the normalised box of each cell/region
    topdown: TopDownConfig = dataclasses.field(default_factory=TopDownConfig)
    mcan: MCANConfig = dataclasses.field(default_factory=MCANConfig)
    scan: SCANConfig = dataclasses.field(default_factory=SCANConfig)
    vlbert: VLBertConfig = dataclasses.field(default_factory=VLBertConfig)
    # vlbert: start from V&L pretraining (a pretrain/vl.py final/ folder); empty = fresh weights
    init_from: str = ""


def shapes_head() -> HeadConfig:
    """The task scripts' default head: the word-to-region head (`scan`), sized for the Shapes
    world on two CPU cores. MCAN (`--set model.arch=mcan`) is sized small too (hidden 64): on
    the Shapes questions and hypotheses it leaves VQA yes/no at the answer prior and SNLI-VE
    entailment vs contradiction at chance (README). Real data: see configs/tasks/."""
    return HeadConfig(arch="scan", mcan=MCANConfig(hidden=64, ffn=128, flat_mlp=64, flat_out=128))


def build_head(
    cfg: HeadConfig, text: QuestionConfig, visual_dim: int, num_outputs: int, vocab_size: int
) -> nn.Module:
    """The head registered as `cfg.arch` with its text encoder; logits (B, num_outputs)."""
    question = build_question_encoder(text, vocab_size)
    return get_head(cfg.arch)(cfg, question, visual_dim, num_outputs, 4 if cfg.spatial else 0)


@register_head("topdown")
def topdown(cfg: HeadConfig, question: nn.Module, visual_dim: int, num_outputs: int, spatial: int):
    return TopDown(question, visual_dim, num_outputs, cfg.topdown, spatial)


@register_head("mcan")
def mcan(cfg: HeadConfig, question: nn.Module, visual_dim: int, num_outputs: int, spatial: int):
    return MCAN(question, visual_dim, num_outputs, cfg.mcan, spatial)


@register_head("scan")
def scan(cfg: HeadConfig, question: nn.Module, visual_dim: int, num_outputs: int, spatial: int):
    return WordRegionFusion(question, visual_dim, num_outputs, cfg.scan, spatial)


class VLModel(nn.Module):
    """A task head over store features (`features`, `visual_mask`, `spatial` in the batch) or,
    with a `backbone`, over the grid of `pixels`; text from `text_ids`/`text_mask`; the batch
    keys a head names in `batch_keys` are passed to it by name."""

    def __init__(self, head: nn.Module, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.head, self.backbone = head, backbone

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.backbone is not None:
            feats, hw = self.backbone(batch["pixels"])  # (B, H*W, C)
            mask, spatial = grid_inputs(feats, hw)
        else:
            feats, mask, spatial = batch["features"], batch["visual_mask"], batch["spatial"]
        extra = {k: batch[k] for k in getattr(self.head, "batch_keys", ()) if k in batch}
        return self.head(feats, mask, batch["text_ids"], batch["text_mask"], spatial, **extra)
