"""CLIP InfoNCE loss in the local-loss form (local rows x gathered columns), exact across ranks.

On rank r with local batch B, the logits are `scale * local @ gathered.T` of shape (B, world*B)
and the targets are `arange(B) + r*B`. Averaging the per-rank losses (which DDP does to the
gradients) gives exactly the loss of one process over the whole global batch, because
`gather_with_grad` sums the gradients of all ranks' losses back onto each rank's features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cliptransfer.engine.distributed import gather_with_grad, world_info

__all__ = [
    "CLIP_LOGIT_SCALE_INIT",
    "at_least_fp32",
    "clamp_logit_scale_",
    "clip_loss",
    "contrastive_ce",
    "local_targets",
]

# Parameter value (log of the scale): OpenAI CLIP initialises the temperature to 0.07.
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


@torch.no_grad()
def clamp_logit_scale_(
    param: torch.Tensor, max_scale: float = 100.0, min_scale: float | None = None
) -> torch.Tensor:
    """Clamp a log-scale parameter in place so that exp(param) lies in [min_scale, max_scale].

    Call after each optimizer step (OpenAI clamps the scale at 100; DeCLIP also keeps a floor).
    """
    if max_scale <= 0 or (min_scale is not None and not 0 < min_scale <= max_scale):
        raise ValueError(
            f"clamp_logit_scale_: need 0 < min_scale <= max_scale, got min_scale={min_scale}, "
            f"max_scale={max_scale}"
        )
    low = math.log(min_scale) if min_scale is not None else None
    param.clamp_(min=low, max=math.log(max_scale))
    return param


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to fp32 (keep fp32/fp64): log-softmax/log-sigmoid sums over thousands of
    terms lose the small ones in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def local_targets(batch: int, device: torch.device | str) -> torch.Tensor:
    """Targets of this rank's rows in the gathered columns: arange(B) + rank*B."""
    rank, _ = world_info()
    return torch.arange(batch, device=device) + rank * batch


def contrastive_ce(
    rows: torch.Tensor,
    cols: torch.Tensor,
    logit_scale: torch.Tensor | float,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of `scale * rows @ cols.T` (B, N) against `targets` (B,), mean over rows."""
    logits = logit_scale * rows @ cols.T  # (B, N)
    return F.cross_entropy(at_least_fp32(logits), targets)


def check_pair(name: str, img: torch.Tensor, txt: torch.Tensor) -> None:
    """Raise a clear ValueError unless img/txt are matching non-empty (B, D) batches."""
    if img.ndim != 2 or txt.ndim != 2 or img.shape != txt.shape or img.shape[0] == 0:
        raise ValueError(
            f"{name}: expected image and text features of the same shape (B, D) with B > 0, got "
            f"image {tuple(img.shape)} and text {tuple(txt.shape)}"
        )


def clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE of paired features, with negatives from all ranks.

    img, txt: (B, D) local features (L2-normalised here, so raw projections are fine).
    logit_scale: the multiplicative scale, i.e. `model.logit_scale.exp()`, not the log.
    Returns (CE(image->text) + CE(text->image)) / 2, averaged over this rank's rows.
    """
    check_pair("clip_loss", img, txt)
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    all_img = gather_with_grad(img)  # (world*B, D)
    all_txt = gather_with_grad(txt)  # (world*B, D)
    targets = local_targets(img.shape[0], img.device)
    loss_i2t = contrastive_ce(img, all_txt, logit_scale, targets)
    loss_t2i = contrastive_ce(txt, all_img, logit_scale, targets)
    return (loss_i2t + loss_t2i) / 2
