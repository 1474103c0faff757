"""`loss.recipe=reference`: the model-level choices of Sense-GVT/DeCLIP (commit 5d99a85).

The loss functions are shared with the default recipe; what changes is the model around them.
File/line references are to the reference repository at that commit.

FILIP (and DeFILIP's FILIP term)
  * `filip_topk_loss`: 16 image and 16 text tokens per pair, chosen by summed similarity to the
    matched partner, used on the candidate side only (prototype/model/filip.py 71-106).
  * Its own temperature `logit_scale_dense`, initialised to log(1/0.07) (filip.py 43-44,
    defilip.py 180-181) and clamped to [3, 6] by the solver like `logit_scale`
    (filip_solver.py 644-646, 659-661). The reference never caps it at 100.
  * Token features: ViT patch tokens *before* `ln_post` (visual_transformer.py 68) and every
    text position of the final-LN states (text_transformer.py 194-200, padding included), each
    through its own Linear to 256-d (`image_mapping`, `text_mapping`, filip.py 39-41, 130-134).
    ResNet towers: the layer4 grid before the attention pool (modified_resnet.py 205), which is
    what the reference's R50 FILIP maps (its `dense_mapping_image=2048`); there is no
    "before ln_post" for a ConvNet, and the pool mixes every location into each output.
  * The reference configs set `text_mask_type: MLM` for FILIP too (yfcc15m_vit_filip/config.yaml
    line 18): its text tokens are the masked caption's, though FILIP trains no MLM term.
    Its solver adds the CLIP loss with weight 0 (config `clip_loss: 0.0`); so does this recipe,
    which also keeps every tower parameter in the graph (DDP without find_unused_parameters).

DeCLIP / DeFILIP (declip.py 214-217, 281-288; defilip.py 290-292, 329-336, 369-376)
  * `text_mask_type: MLM`: one *causal* text pass over the masked caption gives the caption
    embedding used by MVS and the NNS lookup and queue, FILIP's text tokens, and the MLM
    logits (`text_label_predictor`, a Linear from the text width to the vocabulary, on the
    final-LN states: left context only). The EDA caption is encoded unmasked.
  * NNS: the queue is per rank (no gather before enqueueing; lightly's memory bank), 65,536
    entries (`nn_size=2**16`); the EDA caption is enqueued before the caption (lines 285-288).
    This is the one choice that makes the loss depend on the number of processes: the first
    step is exact, later lookups see a queue of this rank's rows only.

SLIP (prototype/model/slip.py 209-285, `return_sim`, `sim_dim: 256`)
  * CLIP on a third, base view; SimCLR on views 1 and 2.
  * The SimCLR MLP is 4096 wide (`hidden_dim=4096`, no output BN), fed the pre-projection
    features (`return_feature`: ViT `ln_post(cls)`; ResNet: the attention-pooled layer4 features
    before the projection to the joint space — the reference's R50 pools to 2048-d and then
    projects with a separate `fc`, modified_resnet_modified.py 204-206; timm's pool ends in that
    projection, so its input is taken), one view at a time, so each BatchNorm normalises each
    view with its own statistics.

Logit scale (every experiments/*/config.yaml: `grad_clip: logit_scale_param_value, value: 3,
max_value: 6`): after each optimizer step the log scale is clamped to [3, 6], and to
log(loss.logit_scale_max) (100: the reference's forward caps the scale at 100, clip.py 134).
The reference also clamps before the step, which only matters for the first step (its initial
log(1/0.07) = 2.66 is below 3). SigLIP has no reference counterpart and keeps its own settings.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cliptransfer.contrastive.losses.clip import clip_loss
from cliptransfer.contrastive.losses.declip import mlm_loss, mvs_loss, nns_loss, simsiam_loss
from cliptransfer.contrastive.losses.filip_topk import REFERENCE_FILIP_TOP_K, filip_topk_loss
from cliptransfer.contrastive.losses.siglip import siglip_loss
from cliptransfer.contrastive.losses.slip import simclr_loss

if TYPE_CHECKING:
    from cliptransfer.contrastive.objectives import ContrastiveModel, LossConfig

__all__ = [
    "MASKED_CAPTION_METHODS",
    "REFERENCE_DENSE_DIM",
    "REFERENCE_FILIP_TOP_K",
    "REFERENCE_LOG_SCALE_BOUNDS",
    "REFERENCE_QUEUE_SIZE",
    "REFERENCE_SIMCLR_HIDDEN",
    "ImageParts",
    "clamp_reference_scales_",
    "encode_image_parts",
    "encode_text_parts",
    "needs_masked_caption",
    "needs_third_view",
    "reference_forward",
    "vision_feature_width",
]

REFERENCE_QUEUE_SIZE = 2**16  # DECLIP(nn_size=2**16)
REFERENCE_SIMCLR_HIDDEN = 4096  # SLIP: projection_MLP(feature_dim, hidden_dim=4096, ...)
REFERENCE_DENSE_DIM = 256  # FILIP(dense_embed_dim=256)
REFERENCE_LOG_SCALE_BOUNDS = (3.0, 6.0)  # grad_clip: value 3, max_value 6
# Methods whose reference configs set `text_mask_type: MLM`.
MASKED_CAPTION_METHODS = ("filip", "declip", "defilip")


class ImageParts(NamedTuple):
    embeds: torch.Tensor  # (B, D) projected image embedding (as `CLIP.encode_image`)
    pooled: torch.Tensor  # (B, W) the same before the output projection
    tokens: torch.Tensor  # (B, n, W) ViT patch tokens before ln_post / ResNet layer4 grid


def vision_feature_width(visual: nn.Module) -> int:
    """W of `ImageParts.pooled` and `.tokens`: the ViT width, the ResNet's layer4 channels."""
    return int(visual.num_features)


def encode_image_parts(visual: nn.Module, pixels: torch.Tensor) -> ImageParts:
    """One pass of a timm CLIP image tower that returns what the reference's `return_dense`
    and `return_feature` outputs hold, next to the usual embedding."""
    if isinstance(visual, VisionTransformer):
        x = visual.norm_pre(visual.patch_drop(visual._pos_embed(visual.patch_embed(pixels))))
        if visual.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(visual.blocks, x)
        else:
            x = visual.blocks(x)  # (B, 1 + n, W)
        tokens = x[:, visual.num_prefix_tokens :]  # before ln_post (visual.norm)
        pooled = visual.forward_head(visual.norm(x), pre_logits=True)  # (B, W) ln_post(cls)
        return ImageParts(visual.head(pooled), pooled, tokens)
    feats = visual.forward_features(pixels)  # (B, W, H, W')
    tokens = feats.flatten(2).transpose(1, 2)  # (B, H*W', W)
    pooled = visual.head(feats, pre_logits=True)  # attention pool before its `proj`
    return ImageParts(visual.head.proj(pooled), pooled, tokens)


def encode_text_parts(
    clip: nn.Module, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal text pass -> (EOT-pooled projected embedding (B, D), final-LN states (B, L, W))."""
    hidden = clip.encode_text_hidden(token_ids)  # (B, L, W), causal
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), token_ids.argmax(dim=-1)]
    return pooled @ clip.text_projection, hidden


def needs_masked_caption(cfg: LossConfig, weights: dict[str, float]) -> bool:
    """Whether the data must carry the MLM-masked caption (`mlm_input`, `mlm_labels`)."""
    if cfg.recipe == "reference" and cfg.method in MASKED_CAPTION_METHODS:
        return True
    return "mlm" in weights


def needs_third_view(cfg: LossConfig, weights: dict[str, float]) -> bool:
    return cfg.recipe == "reference" and "simclr" in weights


def _log_bounds(cfg: LossConfig) -> tuple[float, float]:
    """[low, high] of the main log scale: the reference's [3, 6] within the configured bounds."""
    low, high = REFERENCE_LOG_SCALE_BOUNDS
    if cfg.logit_scale_min is not None:
        low = max(low, math.log(cfg.logit_scale_min))
    return low, min(high, math.log(cfg.logit_scale_max))


@torch.no_grad()
def clamp_reference_scales_(model: nn.Module, cfg: LossConfig) -> None:
    """The reference solver's clamp (after each step): `clip.logit_scale` to [3, 6] and to the
    configured bounds, `logit_scale_dense` (if any) to [3, 6]. SigLIP keeps the default."""
    from cliptransfer.contrastive.losses.clip import clamp_logit_scale_

    if cfg.method == "siglip":
        clamp_logit_scale_(model.clip.logit_scale, cfg.logit_scale_max, cfg.logit_scale_min)
        return
    model.clip.logit_scale.clamp_(*_log_bounds(cfg))
    dense = getattr(model, "logit_scale_dense", None)
    if dense is not None:
        dense.clamp_(*REFERENCE_LOG_SCALE_BOUNDS)


def _nns(model: ContrastiveModel, imgs: list[torch.Tensor], txt_views: list[torch.Tensor],
         scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Image -> NN(text) over both image views x (caption, EDA caption), looked up before any
    enqueue; then the EDA caption is enqueued before the caption (declip.py 282-288)."""
    losses = [nns_loss(i, t, model.queue, scale) for t in txt_views for i in imgs]
    if model.training:
        for t in reversed(txt_views):
            model.queue.enqueue(t.detach())
    return torch.stack(losses).mean()


def reference_forward(model: ContrastiveModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`ContrastiveModel.forward` under the reference recipe: {"loss", term: value, ...}."""
    w, cfg, clip = model.weights, model.cfg, model.clip
    scale = clip.logit_scale.exp()
    terms: dict[str, torch.Tensor] = {}
    masked = needs_masked_caption(cfg, w)
    txt, hidden = encode_text_parts(clip, batch["mlm_input"] if masked else batch["text"])
    base = encode_image_parts(clip.visual, batch["image"])
    img = base.embeds  # (B, D)
    if "simclr" in w:  # SLIP: CLIP on the base view, SimCLR on views 1 and 2, BN per view
        z1 = model.simclr_head(encode_image_parts(clip.visual, batch["image_view"]).pooled)
        z2 = model.simclr_head(encode_image_parts(clip.visual, batch["image_view2"]).pooled)
        terms["simclr"] = simclr_loss(z1, z2, cfg.simclr_temperature)
    img2 = None
    if "mvs" in w or "simsiam" in w or "nns" in w:  # DeCLIP's two image views
        img2 = clip.encode_image(batch["image_view"])  # (B, D)
    if "clip" in w or cfg.method == "filip":
        terms["clip"] = clip_loss(img, txt, scale)
    if "siglip" in w:
        terms["siglip"] = siglip_loss(img, txt, scale, model.logit_bias, cfg.siglip_chunk)
    txt_views = [txt]
    if "text_aug" in batch and ("mvs" in w or "nns" in w):
        txt_views.append(clip.encode_text(batch["text_aug"]))  # the EDA caption, unmasked
    if "mvs" in w:
        terms["mvs"] = mvs_loss([img, img2], txt_views, scale)
    if "nns" in w:
        terms["nns"] = _nns(model, [img, img2], txt_views, scale)
    if "simsiam" in w:
        p1, z1 = model.simsiam_head(img)
        p2, z2 = model.simsiam_head(img2)
        terms["simsiam"] = simsiam_loss(p1, p2, z1, z2)
    if "mlm" in w:  # through the causal pass over the masked caption: left context only
        terms["mlm"] = mlm_loss(model.mlm_head(hidden), batch["mlm_labels"])
    if "filip" in w:
        terms["filip"] = filip_topk_loss(
            model.image_mapping(base.tokens),  # (B, n, 256)
            model.text_mapping(hidden),  # (B, L, 256): every position
            model.logit_scale_dense.exp(),
            REFERENCE_FILIP_TOP_K,
            cfg.filip_chunk,
        )
    # Weight-0 terms (FILIP's CLIP loss) still enter the sum, as in the reference's solver.
    loss = sum(w.get(name, 0.0) * value for name, value in terms.items())
    return {"loss": loss, **terms}
