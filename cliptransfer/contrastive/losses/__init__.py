"""Contrastive pretraining objectives on tensors (CLIP, SigLIP, SLIP, DeCLIP, FILIP/DeFILIP).

Every loss uses the local-loss form: this rank's rows against candidates gathered (with
gradients) from all ranks, so the mean over ranks equals the single-process loss over the
global batch. `logit_scale` arguments are multiplicative scales (`param.exp()`), not logs.
"""

from __future__ import annotations

from cliptransfer.contrastive.losses.clip import (
    CLIP_LOGIT_SCALE_INIT,
    clamp_logit_scale_,
    clip_loss,
)
from cliptransfer.contrastive.losses.declip import (
    DEFILIP_WEIGHTS,
    DeCLIPWeights,
    FeatureQueue,
    SimSiamHead,
    declip_loss,
    mask_tokens,
    mlm_loss,
    mvs_loss,
    nns_loss,
    simsiam_loss,
    weighted_sum,
)
from cliptransfer.contrastive.losses.filip import filip_loss, filip_similarity, select_image_tokens
from cliptransfer.contrastive.losses.siglip import (
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    siglip_loss,
)
from cliptransfer.contrastive.losses.slip import simclr_loss, slip_loss

__all__ = [
    "CLIP_LOGIT_SCALE_INIT",
    "DEFILIP_WEIGHTS",
    "SIGLIP_LOGIT_BIAS_INIT",
    "SIGLIP_LOGIT_SCALE_INIT",
    "DeCLIPWeights",
    "FeatureQueue",
    "SimSiamHead",
    "clamp_logit_scale_",
    "clip_loss",
    "declip_loss",
    "filip_loss",
    "filip_similarity",
    "mask_tokens",
    "mlm_loss",
    "mvs_loss",
    "nns_loss",
    "select_image_tokens",
    "siglip_loss",
    "simclr_loss",
    "simsiam_loss",
    "slip_loss",
    "weighted_sum",
]
