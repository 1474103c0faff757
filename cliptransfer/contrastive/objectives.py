"""One composable loss graph for CLIP, SLIP, DeCLIP, FILIP, DeFILIP and SigLIP.

A method is just a set of term weights (`METHODS`); `ContrastiveModel` owns the CLIP model plus the
heads those terms need (SimCLR projector, SimSiam head, MLM head, SigLIP bias, the DeCLIP queue),
computes every term with a nonzero weight in `forward`, and returns them all for logging. Keeping
heads and queue inside one module means DDP wraps them together and checkpoints include them.

`loss.recipe` picks the model around the losses: "default" (this module's forward, with the
deliberate fixes: FILIP padding masked, one exact cross-rank NNS queue) or "reference" (the
Sense-GVT/DeCLIP model-level choices, `cliptransfer.contrastive.reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.config import ConfigError, check, check_range
from cliptransfer.contrastive.losses.clip import (
    CLIP_LOGIT_SCALE_INIT,
    clamp_logit_scale_,
    clip_loss,
)
from cliptransfer.contrastive.losses.declip import (
    FeatureQueue,
    SimSiamHead,
    mlm_loss,
    mvs_loss,
    nns_loss,
    simsiam_loss,
)
from cliptransfer.contrastive.losses.filip import filip_loss
from cliptransfer.contrastive.losses.siglip import siglip_loss
from cliptransfer.contrastive.losses.slip import simclr_loss
from cliptransfer.contrastive.reference import (
    REFERENCE_DENSE_DIM,
    REFERENCE_LOG_SCALE_BOUNDS,
    REFERENCE_QUEUE_SIZE,
    REFERENCE_SIMCLR_HIDDEN,
    clamp_reference_scales_,
    reference_forward,
    vision_feature_width,
)

# Term weights per method (DeCLIP paper / Sense-GVT benchmark defaults).
METHODS: dict[str, dict[str, float]] = {
    "clip": {"clip": 1.0},
    "slip": {"clip": 1.0, "simclr": 1.0},
    "declip": {"mvs": 0.4, "simsiam": 0.2, "mlm": 0.2, "nns": 0.2},
    "filip": {"filip": 1.0},
    "defilip": {"mvs": 0.4, "simsiam": 0.2, "mlm": 0.2, "nns": 0.2, "filip": 0.2},
    "siglip": {"siglip": 1.0},
}
TERMS = ("clip", "simclr", "mvs", "simsiam", "mlm", "nns", "filip", "siglip")


@dataclass
class LossConfig:
    method: str = "clip"
    # "reference": Sense-GVT/DeCLIP's model-level choices (cliptransfer/contrastive/reference.py)
    recipe: Literal["default", "reference"] = "default"
    weights: dict[str, float] = field(default_factory=dict)  # per-term overrides of the preset
    logit_scale_max: float = 100.0  # OpenAI's clamp of exp(logit_scale)
    logit_scale_min: float | None = None  # DeCLIP-style floor (None: no floor)
    simclr_temperature: float = 0.1
    simclr_dim: int = 256
    simclr_hidden: int | None = None  # SimCLR MLP width; None: 4 * simclr_dim, reference 4096
    simsiam_proj_dim: int = 1024
    simsiam_pred_dim: int = 512
    queue_size: int | None = None  # NNS queue entries; None: 4096, reference 65,536
    filip_chunk: int = 64
    filip_token_keep: float = 1.0  # FILIP token selection (0.25 in the paper)
    siglip_chunk: int | None = None

    def __post_init__(self) -> None:
        # Caught here rather than when the model is built, i.e. before any data is read.
        check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}", self.method)
        for name, w in self.weights.items():
            if name not in TERMS:
                raise ConfigError(f"weights.{name}: unknown term; terms are {', '.join(TERMS)}")
            check_range(f"weights.{name}", w, ge=0)
        # Bounds of exp(logit_scale), i.e. of the logit multiplier itself (not its log).
        check_range("logit_scale_max", self.logit_scale_max, gt=0)
        check_range("logit_scale_min", self.logit_scale_min, gt=0, le=self.logit_scale_max)
        check_range("simclr_temperature", self.simclr_temperature, gt=0)
        check(self.recipe in ("default", "reference"), "recipe", "must be default or reference",
              self.recipe)  # fmt: skip
        reference = self.recipe == "reference"
        # Resolved here, so the saved config names the sizes a run really used.
        if self.queue_size is None:
            self.queue_size = REFERENCE_QUEUE_SIZE if reference else 4096
        if self.simclr_hidden is None:
            self.simclr_hidden = REFERENCE_SIMCLR_HIDDEN if reference else 4 * self.simclr_dim
        for name in ("simclr_dim", "simclr_hidden", "simsiam_proj_dim", "simsiam_pred_dim",
                     "queue_size"):  # fmt: skip
            check_range(name, getattr(self, name), ge=1)
        check_range("filip_chunk", self.filip_chunk, ge=1)
        check_range("filip_token_keep", self.filip_token_keep, gt=0, le=1)
        check_range("siglip_chunk", self.siglip_chunk, ge=1)
        if reference:
            # The reference keeps 16 tokens of its own; a fraction on top would be neither.
            check(self.filip_token_keep == 1, "filip_token_keep",
                  "must be 1 with recipe=reference (it keeps 16 tokens by itself)",
                  self.filip_token_keep)  # fmt: skip
            low = math.exp(REFERENCE_LOG_SCALE_BOUNDS[0])
            check(self.logit_scale_max >= low, "logit_scale_max",
                  f"must be >= exp(3) = {low:.2f} with recipe=reference (its floor)",
                  self.logit_scale_max)  # fmt: skip


def resolve_weights(cfg: LossConfig) -> dict[str, float]:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    weights = dict(METHODS[cfg.method])
    for name, w in cfg.weights.items():
        if name not in TERMS:
            raise ValueError(f"loss.weights.{name}: unknown term; terms are {', '.join(TERMS)}")
        weights[name] = float(w)
    weights = {k: v for k, v in weights.items() if v != 0}
    if not weights:
        raise ValueError("every loss weight is 0: nothing to train")
    return weights


def needs_second_view(weights: dict[str, float]) -> bool:
    return any(t in weights for t in ("simclr", "mvs", "simsiam"))


class ContrastiveModel(nn.Module):
    """CLIP + the heads of the enabled terms. `forward(batch)` -> {"loss", term: value, ...}."""

    def __init__(self, clip: nn.Module, cfg: LossConfig) -> None:
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.weights = resolve_weights(cfg)
        dim = clip.config.embed_dim
        reference = cfg.recipe == "reference"
        # The reference feeds SimCLR and FILIP the tower's pre-projection width, and predicts
        # MLM from the text width (see reference.py); the default works in the joint space.
        vision_width = vision_feature_width(clip.visual) if reference else dim
        text_width = clip.config.text.width if reference else dim
        if "simclr" in self.weights:  # SLIP's 3-layer MLP projector
            hidden = cfg.simclr_hidden
            self.simclr_head = nn.Sequential(
                nn.Linear(vision_width, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, cfg.simclr_dim),
            )
        if "simsiam" in self.weights:
            self.simsiam_head = SimSiamHead(dim, cfg.simsiam_proj_dim, cfg.simsiam_pred_dim)
        if "mlm" in self.weights:
            self.mlm_head = nn.Linear(text_width, clip.config.text.vocab_size)
        if "nns" in self.weights:  # the reference's queue is per rank
            self.queue = FeatureQueue(cfg.queue_size, dim, gather=not reference)
        if "filip" in self.weights and reference:  # token maps and FILIP's own temperature
            self.image_mapping = nn.Linear(vision_width, REFERENCE_DENSE_DIM)
            self.text_mapping = nn.Linear(text_width, REFERENCE_DENSE_DIM)
            self.logit_scale_dense = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        if "siglip" in self.weights:
            # SigLIP's init: t' = log 10, b = -10 (Zhai et al. 2023).
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(10.0))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.cfg.recipe == "reference":
            return reference_forward(self, batch)
        w, cfg, clip = self.weights, self.cfg, self.clip
        scale = clip.logit_scale.exp()
        image, text = batch["image"], batch["text"]  # (B, 3, S, S), (B, L)
        terms: dict[str, torch.Tensor] = {}
        need_global = any(t in w for t in ("clip", "simclr", "mvs", "simsiam", "nns", "siglip"))
        img = clip.encode_image(image) if need_global else None  # (B, D)
        txt = clip.encode_text(text) if need_global else None  # (B, D)
        img2 = txt2 = None
        if needs_second_view(w):
            img2 = clip.encode_image(batch["image_view"])  # (B, D)
        if "clip" in w:
            terms["clip"] = clip_loss(img, txt, scale)
        if "siglip" in w:
            terms["siglip"] = siglip_loss(img, txt, scale, self.logit_bias, cfg.siglip_chunk)
        if "simclr" in w:
            z = self.simclr_head(torch.cat([img, img2]))  # one BN pass over both views
            z1, z2 = z.chunk(2)
            terms["simclr"] = simclr_loss(z1, z2, cfg.simclr_temperature)
        if "mvs" in w or "nns" in w:
            txt_views = [txt]
            if "text_aug" in batch:
                txt2 = clip.encode_text(batch["text_aug"])
                txt_views.append(txt2)
            if "mvs" in w:
                terms["mvs"] = mvs_loss([img, img2], txt_views, scale)
            if "nns" in w:
                terms["nns"] = self._nns(img, img2, txt_views, scale)
        if "simsiam" in w:
            p1, z1 = self.simsiam_head(img)
            p2, z2 = self.simsiam_head(img2)
            terms["simsiam"] = simsiam_loss(p1, p2, z1, z2)
        if "mlm" in w:
            tokens, _ = clip.encode_text_tokens(batch["mlm_input"], causal=False)  # (B, L, D)
            terms["mlm"] = mlm_loss(self.mlm_head(tokens), batch["mlm_labels"])
        if "filip" in w:
            img_tok = clip.encode_image_tokens(image)  # (B, n, D)
            txt_tok, mask = clip.encode_text_tokens(text)  # (B, L, D), (B, L)
            terms["filip"] = filip_loss(
                img_tok, txt_tok, mask, scale, cfg.filip_chunk, cfg.filip_token_keep
            )
        loss = sum(w[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}

    def _nns(self, img, img2, txt_views, scale) -> torch.Tensor:
        # Look every text view up before enqueueing any (DeCLIP's order), then enqueue them all.
        losses = [nns_loss(i, t, self.queue, scale) for t in txt_views for i in (img, img2)]
        if self.training:
            for t in txt_views:
                self.queue.enqueue(F.normalize(t.detach(), dim=-1))
        return torch.stack(losses).mean()


def clamp_logit_scales_(model: nn.Module, cfg: LossConfig) -> None:
    """The solver's clamp after each optimizer step: exp(logit_scale) into [logit_scale_min,
    logit_scale_max] by default; the reference's [3, 6] on the log scale(s) with recipe=reference.
    `model` is a ContrastiveModel (or a PEFT wrapper of one)."""
    if cfg.recipe == "reference":
        clamp_reference_scales_(model, cfg)
    else:
        clamp_logit_scale_(model.clip.logit_scale, cfg.logit_scale_max, cfg.logit_scale_min)
